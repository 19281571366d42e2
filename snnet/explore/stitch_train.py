"""`snnet stitch-train`: train one stitching layer between two frozen anchors (Traft & Cheney's experiment).

A run is the network

    front anchor, from its input up to and including its block i  ->  stitching layer  ->  end anchor from block j on

with blocks numbered flat over the stages (0 = the first block). j may be any block (a "gap"): the block aligned with
i, one after it (dropping depth), one before it (repeating depth), or one past the last block (the end anchor only
runs its final norm and head). Front and end may be the same anchor, two anchors of one family, or two families whose
features meet at the same resolution (the layout bridges of snnet/core/layers.py: tokens, NHWC, NCHW). Only the stitching
layer trains: both anchors are frozen and stay in eval mode, so their weights and BatchNorm statistics are exactly
the pretrained ones after training, and dropout / drop-path stay off. The loss is cross-entropy, or distillation from
the end anchor's own logits (KL at a temperature, mixed with cross-entropy by kd_alpha).

Everything is the library's: the network is an `SNNet` with a one-route plan whose anchors are seen through
`_CutView` (all blocks as one stage, with the widths and layouts at this run's cut), so the least-squares init
(ls_init.py), FLOPs (cost.py), exact parameter counts (model.py), the training loop (engine.py), optimizer and
schedule (optim.py, train.py's flags), loaders (data.py), checkpoints (checkpoint.py), atomic files (fileio.py),
progress lines (progress.py) and the results file (results.py) are the ones train.py uses.

A sweep file (YAML, docs/stitch_train.md) lists runs as a grid and/or one by one. Each run writes, in its own folder
named after what it is (so editing the sweep never mixes runs): ``trajectory.jsonl`` (a line per optimizer step and
per epoch, rewritten atomically after every epoch), ``stitch_layer.pth.tar`` (the trained layer) and, last,
``result.json`` (metadata and final metrics). A run whose result.json exists is finished and skipped by a rerun. The
sweep folder gets ``stitches_res.txt`` (cfg_id = the run's index in the sweep; the anchors follow as the last cfg_ids)
that `snnet pareto` reads.

Under torchrun the runs are split across the processes (run k on rank k mod world size), each run in one process,
with no communication: a run's result is then the same whether the sweep ran in one process or in many, and a
half-finished sweep can be continued with any number of processes. Sweeps are many small, independent jobs (only a
stitching layer trains, anchors in eval mode have nothing to synchronise), so splitting them scales with no
gradient all-reduce and no batch-size/LR coupling to the world size. At the end the processes meet once (a gloo
process group, used only as a barrier) and rank 0 writes the results file and the table.
"""
from __future__ import annotations

from snnet.core.errors import SNNetError
import argparse
import copy
import dataclasses
import difflib
import hashlib
import itertools
import json
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from snnet.core.adapter import NCHW, AnchorAdapter, Unit

_logger = logging.getLogger("snnet")

RESULT, TRAJECTORY, LAYER_CKPT, SWEEP_JSON = "result.json", "trajectory.jsonl", "stitch_layer.pth.tar", "sweep.json"
FORMAT = "snnet-stitch-train/1"


class SweepError(SNNetError):
    """A sweep file or stitch-train request that cannot be run; the message names the value and the fix."""


# ---------------------------------------------------------------------------------------------------- the sweep file
#: train.py flags a stitch-train run starts from (Traft & Cheney's across-scales recipe: AdamW 2e-3, weight decay
#: 0.05, cosine over 10 epochs, no warm-up, plain cross-entropy, random-resized crops of scale 0.9-1); the sweep's
#: ``train`` mapping overrides them
TRAIN_DEFAULTS = {"epochs": 10, "opt": "adamw", "lr": 2e-3, "weight_decay": 0.05, "sched": "cosine",
                  "warmup_epochs": 0, "smoothing": 0.0, "scale": [0.9, 1.0]}
#: train.py flags a sweep's ``train`` mapping may not set, and why
TRAIN_REFUSED = {
    "model": "the anchors come from the sweep's `anchors`", "stitch_config": "the anchors come from `anchors`",
    "config": "write the flags into `train` itself", "data": "use the sweep's `data`", "data_dir": "use `data`",
    "seed": "set the seed per run (`run: {seed: S}` or a `seed` grid)", "output": "use the sweep's `out`",
    "experiment": "use the sweep's `out`", "resume": "a finished run is skipped, an unfinished one starts over",
    "initial_checkpoint": "the anchors' weights come from `anchors`", "auto_resume": "finished runs are skipped",
    "eval": "stitch-train trains", "freeze_anchors": "the anchors are always frozen",
    "distillation_type": "use `loss: kd` (distillation from the end anchor's logits)", "teacher": "use `loss: kd`",
    "teacher_checkpoint": "use `loss: kd`", "distillation_alpha": "use `kd_alpha`",
    "distillation_tau": "use `temperature`", "mixup": "mixup is not supported by stitch-train",
    "cutmix": "cutmix is not supported by stitch-train", "cutmix_minmax": "cutmix is not supported",
    "model_ema": "EMA weights are not supported by stitch-train", "split_bn": "the anchors' BatchNorm is frozen",
    "sync_bn": "the anchors' BatchNorm is frozen", "aug_splits": "augmentation splits are not supported",
    "val_stitches": "the one stitched network is validated every epoch", "sample_sync": "one network per run",
    "torchcompile": "not supported by stitch-train", "dry_run": "use stitch-train --dry-run",
}
SWEEP_KEYS = ("description", "data", "out", "pretrained", "anchors", "train", "run", "grid", "runs")
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
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


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
    anchors: dict[str, Any]          # label -> AnchorSpec
    train: dict[str, Any]            # train.py dest -> value (the sweep's own entries)
    runs: list[RunSpec]
    pretrained: bool = True
    base_dir: Path = field(default_factory=Path.cwd)


def _where(source: str, what: str) -> str:
    return f"{source}: {what}"


def _yaml(path: Path) -> Any:
    import yaml

    from snnet.train.args import _unique_key_loader
    if not path.is_file():
        raise SweepError(f"sweep file {str(path)!r} does not exist; pass an existing YAML file (see "
                         f"configs/sweeps/digits_3x3.yaml)")
    try:
        return yaml.load(path.read_text(), Loader=_unique_key_loader())
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


def _anchor(label: str, value: Any, source: str, base: Path):
    """An anchor: ``FILE#INDEX`` (an anchor of a stitch config), a timm name, or {name, checkpoint, model_kwargs}."""
    from snnet.core.config import ConfigError, load_stitch_config, parse_stitch_config
    if not isinstance(label, str) or not _LABEL.fullmatch(label):
        raise SweepError(_where(source, f"anchor label {label!r} must be letters, digits, _ . + - (it names run "
                                        f"folders); rename it"))
    if isinstance(value, str) and "#" in value:
        file, _, index = value.rpartition("#")
        if not index.isdigit():
            raise SweepError(_where(source, f"anchor {label!r}: {value!r} must be FILE#INDEX, e.g. "
                                            f"configs/demo_digits.json#0"))
        try:
            cfg = load_stitch_config(_resolve_path(file, base))
        except ConfigError as e:
            raise SweepError(_where(source, f"anchor {label!r}: {e}")) from None
        if int(index) >= len(cfg.anchors):
            raise SweepError(_where(source, f"anchor {label!r}: {file!r} has anchors 0..{len(cfg.anchors) - 1}, not "
                                            f"{index}; fix the index"))
        return cfg.anchors[int(index)]
    if isinstance(value, dict) and isinstance(value.get("checkpoint"), str):
        value = {**value, "checkpoint": _resolve_path(value["checkpoint"], base)}
    try:
        return parse_stitch_config({"anchors": [value]}, f"{source}: anchor {label!r}").anchors[0]
    except ConfigError as e:
        raise SweepError(str(e)) from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


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
            close = difflib.get_close_matches(str(value), labels, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SweepError(f"{where}: anchor {value!r} is not in `anchors`{hint}; use one of {', '.join(labels)}")
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
        from snnet.core.layers import stitch_layer_types
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


def _close(name: str, known) -> str:
    close = difflib.get_close_matches(str(name), list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _run_spec(index: int, fields: dict[str, Any], where: str, labels: Sequence[str]) -> RunSpec:
    values = {k: default for k, (_, default) in RUN_FIELDS.items()}
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
        raise SweepError(f"{source}: `anchors` must map labels to anchors (FILE#INDEX of a stitch config, a timm "
                         f"name, or {{name, checkpoint, model_kwargs}})")
    anchors = {label: _anchor(label, v, source, base) for label, v in anchors_raw.items()}
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
    runs, seen = [], {}
    for i, fields in enumerate(combos):
        spec = _run_spec(i, {**defaults, **fields}, f"{source}: run {i}", labels)
        key = dataclasses.replace(spec, index=0)
        if key in seen:
            raise SweepError(f"{source}: runs {seen[key]} and {i} are the same run; remove one")
        seen[key] = i
        runs.append(spec)
    return Sweep(source, data_path, Path(out_dir), anchors, train, runs, pretrained, base)


def load_sweep(path: str | os.PathLike, out: str | None = None, data_dir: str | None = None) -> Sweep:
    path = Path(path)
    return parse_sweep(_yaml(path), f"sweep file {str(path)!r}", path.resolve().parent, out, data_dir)


# ---------------------------------------------------------------------------------------------- the stitched network
class _CutView(AnchorAdapter):
    """An anchor as the SN-Net code sees a plain ViT: every block in one stage, numbered flat, with the width and
    layout of the feature at this run's cut (the front's block output, or the end's input to its first block)."""

    def __init__(self, base: AnchorAdapter, width: int, layout: str):
        self.base, self.width, self.layout = base, width, layout
        self.family = base.family

    def units(self, model) -> list[Unit]:
        units, n = [], 0
        for u in self.base.units(model):
            if u.kind == "block":
                u = dataclasses.replace(u, stage=0, index=n)
                n += 1
            units.append(u)
        return units

    def stage_depths(self, model) -> list[int]:
        return [sum(u.kind == "block" for u in self.base.units(model))]

    def stage_width(self, model, stage: int) -> int:
        return self.width

    def stage_layout(self, model, stage: int) -> str:
        return self.layout


@dataclass
class AnchorProbe:
    """One anchor's units and each unit's output shape (one image, eval mode) at one input size."""
    units: list[Unit]
    shapes: list[tuple[int, ...]]
    blocks: list[int]  # unit index of each block, flat

    @property
    def depth(self) -> int:
        return len(self.blocks)


def probe_anchor(model, adapter: AnchorAdapter, size: tuple[int, int], in_chans: int = 3) -> AnchorProbe:
    import torch

    from snnet.core.cost import eval_mode
    units = adapter.units(model)
    device = next(model.parameters()).device
    shapes = []
    with torch.no_grad(), eval_mode(model):
        x = torch.zeros(1, in_chans, *size, device=device)
        for u in units:
            x = u.run(model, x)
            shapes.append(tuple(x.shape))
    return AnchorProbe(units, shapes, [i for i, u in enumerate(units) if u.kind == "block"])


def _front_point(probe: AnchorProbe, adapter: AnchorAdapter, model, i: int) -> tuple[tuple[int, ...], str]:
    """Shape and layout of the front anchor's output of block i."""
    u = probe.blocks[i]
    return probe.shapes[u], adapter.stage_layout(model, probe.units[u].stage)


def _end_point(probe: AnchorProbe, adapter: AnchorAdapter, model, j: int) -> tuple[tuple[int, ...], str]:
    """Shape and layout of the end anchor's input to block j (the output of the unit before it; with j = depth, the
    last block's output), as `SNNet.entry_unit` and the least-squares init define it."""
    entry = probe.blocks[j] if j < probe.depth else probe.blocks[-1] + 1
    before = probe.units[entry - 1]
    stage = before.stage if before.kind == "block" else probe.units[probe.blocks[min(j, probe.depth - 1)]].stage
    return probe.shapes[entry - 1], adapter.stage_layout(model, stage)


def _width(shape: tuple[int, ...], layout: str) -> int:
    return shape[1] if layout == NCHW else shape[-1]


def aligned_block(cut: int, front_depth: int, end_depth: int) -> int:
    """The end block at the relative depth where the front stopped: floor((i + 1) · depth_end / depth_front)."""
    return (cut + 1) * end_depth // front_depth


def layer_label(layer: dict[str, Any]) -> str:
    """'linear', 'lowrank-rank4', 'lora-alpha1-rank8': the layer type and its options, for routes and folders."""
    opts = "-".join(f"{k}{v}" for k, v in sorted(layer.items()) if k != "type")
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", layer["type"] + (f"-{opts}" if opts else ""))


def build_stitched(front_model, end_model, labels: tuple[str, str], adapters: tuple[AnchorAdapter, AnchorAdapter],
                   probes: tuple[AnchorProbe, AnchorProbe], cut: int, end_block: int, layer: dict[str, Any]):
    """The SNNet of one run: one route, front[..b cut] -> layer -> end[b end_block..] (not LS-initialised, anchors
    not yet frozen). Refuses (SweepError) a cut whose two sides differ in resolution or token count."""
    from snnet.core.build import _describe, _extent, _same_extent
    from snnet.core.model import SNNet
    from snnet.core.plan import LayerSpec, Route, Stitch, StitchPlan
    (fshape, flayout), (eshape, elayout) = (_front_point(probes[0], adapters[0], front_model, cut),
                                            _end_point(probes[1], adapters[1], end_model, end_block))
    fext, eext = _extent(_meta(fshape), flayout), _extent(_meta(eshape), elayout)
    if not _same_extent(fext, eext):
        raise SweepError(f"cannot stitch {labels[0]!r} block {cut} to {labels[1]!r} block {end_block}: the front "
                         f"outputs {_describe(fext)}, the end block takes {_describe(eext)}; pick blocks whose "
                         f"features have the same resolution (same image size, patch size and strides), and for a "
                         f"ViT <-> CNN pair a ViT without class token (model_kwargs class_token: false, "
                         f"global_pool: avg)")
    views = (_CutView(adapters[0], _width(fshape, flayout), flayout),
             _CutView(adapters[1], _width(eshape, elayout), elayout))
    stitch = Stitch(0, 1, 0, cut, end_block, (0,))
    plan = StitchPlan((Route(0, (0, 1), (stitch,)),), (LayerSpec((0,), 0, 1, 0),), 2, hierarchical=False)
    try:
        return SNNet([front_model, end_model], plan, names=list(labels), adapters=list(views), skip_final_norm=False,
                     stitch_layer=layer)
    except ValueError as e:  # a layer type's own option check (e.g. a rank above the widths)
        raise SweepError(f"stitching layer {layer}: {e}") from None


def _meta(shape: tuple[int, ...]):
    """A storage-free tensor of a probed shape (what `build._extent` reads)."""
    import torch
    return torch.empty(shape, device="meta")


# ---------------------------------------------------------------------------------------------- one sweep, prepared
@dataclass
class _Prepared:
    """What every run of a sweep shares: arguments, data, anchors (built once, frozen) and their probes."""
    sweep: Sweep
    args: argparse.Namespace
    train_ds: Any
    val_ds: Any
    device: Any
    models: dict[str, Any]
    adapters: dict[str, AnchorAdapter]
    anchor_ids: dict[str, dict[str, Any]]       # label -> identity (spec + checkpoint hash), hashed into run names
    probes: dict[tuple[str, tuple[int, int]], AnchorProbe] = field(default_factory=dict)
    plans: list[dict[str, Any]] = field(default_factory=list)  # per run: resolved j, names, sizes

    def data_cfg(self, label: str) -> dict[str, Any]:
        from timm.data import resolve_data_config
        return resolve_data_config(vars(self.args), model=self.models[label])

    def size(self, label: str) -> tuple[int, int]:
        return tuple(self.data_cfg(label)["input_size"][1:])

    def probe(self, label: str, size: tuple[int, int]) -> AnchorProbe:
        key = (label, tuple(size))
        if key not in self.probes:
            self.probes[key] = probe_anchor(self.models[label], self.adapters[label], size, self.in_chans)
        return self.probes[key]

    @property
    def in_chans(self) -> int:
        return self.args.in_chans or 3


def _train_args(sweep: Sweep) -> argparse.Namespace:
    """train.py's arguments for the sweep's runs: its parser's defaults < TRAIN_DEFAULTS < the sweep's `train`,
    each value checked as if typed (snnet/train/args.py)."""
    from snnet.train.args import _checked_defaults, build_parser
    parser = build_parser()
    parser.set_defaults(**_checked_defaults(parser, "stitch-train defaults", "key",
                                            [(k, k, v) for k, v in TRAIN_DEFAULTS.items()]))
    parser.set_defaults(**_checked_defaults(parser, f"{sweep.source}: train", "key",
                                            [(k, k, v) for k, v in sweep.train.items()]))
    args = parser.parse_args([sweep.data])
    args.data_dir = args.data
    args.distributed, args.world_size, args.rank = False, 1, 0
    return args


def _device(args: argparse.Namespace):
    import torch

    from snnet.train.device import DeviceError
    name = args.device
    if name is None:
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"--device {name}: CUDA is not available here; set train: {{device: cpu}}")
    args.device = name
    return torch.device(name)


def _anchor_identity(spec, sha_cache: dict[str, str]) -> dict[str, Any]:
    from snnet.results.records import file_sha256
    ident = {"name": spec.name, "model_kwargs": spec.model_kwargs, "checkpoint": spec.checkpoint}
    if spec.checkpoint and Path(spec.checkpoint).is_file():
        if spec.checkpoint not in sha_cache:
            sha_cache[spec.checkpoint] = file_sha256(spec.checkpoint)
        ident["checkpoint_sha256"] = sha_cache[spec.checkpoint]
    return ident


def prepare(sweep: Sweep) -> _Prepared:
    """Every input checked, before anything is written: train.py flags, data, anchors (built and loaded once),
    every run's blocks, resolution and stitching layer."""
    from snnet.core.adapter import adapter_for
    from snnet.core.build import create_anchor
    from snnet.train.data import DataError, check_data, create_datasets, num_classes_of
    from snnet.train.preflight import check_augmentation, check_output
    args = _train_args(sweep)
    check_output(sweep.out)
    check_data(args, need_train=True, world_size=1)
    check_augmentation(args, None)
    train_ds, val_ds = create_datasets(args, need_train=True)
    if val_ds is None:
        raise DataError(f"data folder {args.data_dir!r} has no val/ (or validation/) split; stitch-train validates "
                        f"every epoch: add one")
    if args.num_classes is None:
        args.num_classes = num_classes_of(train_ds)
    device = _device(args)
    used = sorted({r.front for r in sweep.runs} | {r.end for r in sweep.runs}, key=list(sweep.anchors).index)
    kwargs = {k: v for k, v in (("img_size", args.img_size), ("in_chans", args.in_chans)) if v is not None}
    models, adapters, idents, shas = {}, {}, {}, {}
    for label in used:
        spec = sweep.anchors[label]
        model = create_anchor(spec, pretrained=sweep.pretrained, num_classes=args.num_classes, **kwargs)
        model.to(device).eval()
        for p in model.parameters():
            p.requires_grad = False
        models[label], adapters[label] = model, adapter_for(model, label)
        idents[label] = _anchor_identity(spec, shas)
    prep = _Prepared(sweep, args, train_ds, val_ds, device, models, adapters, idents)
    seen: dict[str, int] = {}
    for run in sweep.runs:
        plan = _plan_run(prep, run)
        if plan["spec_hash"] in seen:  # e.g. gap 0 and end_block = the aligned block
            raise SweepError(f"{sweep.source}: runs {seen[plan['spec_hash']]} and {run.index} are the same run "
                             f"({plan['route']}); remove one")
        seen[plan["spec_hash"]] = run.index
        prep.plans.append(plan)
    return prep


def _plan_run(prep: _Prepared, run: RunSpec) -> dict[str, Any]:
    where = f"{prep.sweep.source}: run {run.index}"
    size = prep.size(run.front)
    fp, ep = prep.probe(run.front, size), prep.probe(run.end, size)
    if run.cut >= fp.depth:
        raise SweepError(f"{where}: cut {run.cut} is past the last block of {run.front!r}; use 0..{fp.depth - 1}")
    aligned = aligned_block(run.cut, fp.depth, ep.depth)
    j = run.end_block if run.end_block is not None else aligned + run.gap
    if not 0 <= j <= ep.depth:
        what = f"end_block {j}" if run.end_block is not None else f"gap {run.gap} (end block {aligned} + {run.gap})"
        raise SweepError(f"{where}: {what} is outside the blocks of {run.end!r}, 0..{ep.depth} ({ep.depth}: only its "
                         f"norm and head); pick another gap or cut")
    try:
        net = build_stitched(prep.models[run.front], prep.models[run.end], (run.front, run.end),
                             (prep.adapters[run.front], prep.adapters[run.end]), (fp, ep), run.cut, j, run.layer_spec)
    except SweepError as e:
        raise SweepError(f"{where}: {e}") from None
    ident = {"format": FORMAT, "front": prep.anchor_ids[run.front], "end": prep.anchor_ids[run.end],
             "cut": run.cut, "end_block": j, "layer": run.layer_spec, "ls_init": run.ls_init,
             "ls_images": run.ls_images if run.ls_init else None, "loss": run.loss,
             "temperature": run.temperature if run.loss == "kd" else None,
             "kd_alpha": run.kd_alpha if run.loss == "kd" else None, "seed": run.seed,
             "data": os.path.abspath(prep.args.data_dir), "train": {**TRAIN_DEFAULTS, **prep.sweep.train},
             "pretrained": prep.sweep.pretrained}
    spec_hash = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()
    label = layer_label(run.layer_spec) + ("" if run.ls_init else "_nols") + \
        (f"_kd-t{run.temperature:g}-a{run.kd_alpha:g}" if run.loss == "kd" else "")
    name = f"{run.front}-{run.end}_i{run.cut}_j{j}_{label}_s{run.seed}_{spec_hash[:8]}"
    route_label = label.replace("_", " ")
    route = net.describe(0).replace("-(0)->", f"-({route_label})->")
    return {"end_block": j, "aligned": aligned, "gap": j - aligned, "name": name, "spec_hash": spec_hash,
            "route": route, "size": size, "ident": ident}


# ---------------------------------------------------------------------------------------------- one run
class _TrackedLoss:
    """The run's loss function, also keeping each step's loss and top-1 hits (for the trajectory) and the epoch's."""

    def __init__(self, loss_fn):
        self.loss_fn = loss_fn
        self.step = [0.0, 0, 0, 0]   # loss sum over micro-batches, micro-batches, hits, samples
        self.epoch = [0, 0]          # hits, samples

    def __call__(self, x, out, y):
        loss = self.loss_fn(x, out, y)
        logits = out[0] if isinstance(out, (tuple, list)) else out
        hits = int((logits.detach().argmax(dim=1) == y).sum())
        self.step = [self.step[0] + float(loss.detach()), self.step[1] + 1, self.step[2] + hits,
                     self.step[3] + y.shape[0]]
        self.epoch = [self.epoch[0] + hits, self.epoch[1] + y.shape[0]]
        return loss

    def take_step(self) -> tuple[float, float]:
        loss, n, hits, samples = self.step
        self.step = [0.0, 0, 0, 0]
        return loss / max(n, 1), 100.0 * hits / max(samples, 1)


def _loss_fn(run: RunSpec, args: argparse.Namespace, teacher):
    from snnet.train.losses import DistillationLoss, base_criterion
    base = base_criterion(False, args.smoothing)
    if run.loss == "ce":
        return DistillationLoss(base, None, "none")
    return DistillationLoss(base, teacher, "soft", run.kd_alpha, run.temperature)


class _Trajectory:
    """trajectory.jsonl: one JSON line per optimizer step and per epoch (and the initial evaluation), rewritten
    atomically whenever an epoch ends, so the file always holds whole lines of finished steps."""

    def __init__(self, path: Path, t0: float):
        self.path, self.t0, self.lines = path, t0, []

    def add(self, kind: str, **values) -> dict[str, Any]:
        rec = {"kind": kind, **values, "time": round(time.perf_counter() - self.t0, 4)}
        self.lines.append(json.dumps(rec))
        return rec

    def flush(self) -> None:
        from snnet.core.fileio import write_text_atomic
        write_text_atomic(self.path, "".join(line + "\n" for line in self.lines))


def _lr(optimizer) -> float:
    return sum(g["lr"] for g in optimizer.param_groups) / len(optimizer.param_groups)


def train_run(prep: _Prepared, run: RunSpec, plan: dict[str, Any], run_dir: Path, rank: int = 0,
              world_size: int = 1) -> dict[str, Any]:
    """Train and evaluate one run in this process; writes its folder (result.json last) and returns the result."""
    import torch
    from timm.utils import NativeScaler, random_seed

    from snnet.core.checkpoint import save_checkpoint
    from snnet.core.cost import cost_table
    from snnet.train.data import clean_images, create_eval_loader, create_train_loader
    from snnet.train.device import amp_dtype_for
    from snnet.train.engine import TrainContext, evaluate_stitches, train_one_epoch
    from snnet.core.fileio import write_text_atomic
    from snnet.core.ls_init import ls_init
    from snnet.train.optim import create_optimizer, create_scheduler, epoch_offset, resolve_lrs
    from snnet.train.sampler import seed_epoch

    args = copy.copy(prep.args)
    args.seed = run.seed
    started, t0 = time.strftime("%Y-%m-%dT%H:%M:%S"), time.perf_counter()
    random_seed(run.seed, 0)  # rank 0 on every rank: a run is the same whichever process trains it
    size = plan["size"]
    front, end = prep.models[run.front], prep.models[run.end]
    net = build_stitched(front, end, (run.front, run.end), (prep.adapters[run.front], prep.adapters[run.end]),
                         (prep.probe(run.front, size), prep.probe(run.end, size)), run.cut, plan["end_block"],
                         run.layer_spec)
    net.freeze_anchors()
    net.to(prep.device)
    layer = net.stitch_layer((0,))
    data_cfg = prep.data_cfg(run.front)
    run_dir.mkdir(parents=True, exist_ok=True)
    traj = _Trajectory(run_dir / TRAJECTORY, t0)

    ls_error = None
    if run.ls_init:
        images = clean_images(prep.train_ds, data_cfg, run.ls_images, run.seed)
        reports = ls_init(net, images, mode="joint")
        ls_error = reports[0].rel_error if reports else None
    amp_dtype = amp_dtype_for(args, prep.device)
    loader = create_train_loader(prep.train_ds, args, data_cfg, prep.device)
    val_loader = create_eval_loader(prep.val_ds, args, data_cfg)
    accum = max(1, args.grad_accum_steps)
    steps = len(loader) // accum
    lr, warmup_lr, min_lr = resolve_lrs(args, args.batch_size * accum)
    optimizer = create_optimizer(args, net, lr)
    scheduler, num_epochs = create_scheduler(args, optimizer, steps, warmup_lr, min_lr)
    tracked = _TrackedLoss(_loss_fn(run, args, end))
    epoch_box = [0]

    def log_step(global_step: int) -> None:
        loss, acc = tracked.take_step()
        traj.add("step", epoch=epoch_box[0] + 1, step=global_step, lr=_lr(optimizer), loss=loss, train_acc1=acc)

    ctx = TrainContext(prep.device, lambda step: 0, amp_dtype,
                       NativeScaler(device=prep.device.type) if amp_dtype == torch.float16 else None, scheduler,
                       parameters=lambda: [p for p in net.parameters() if p.requires_grad], after_step=[log_step])

    def validate() -> dict[str, float]:
        return evaluate_stitches(net, val_loader, [0], prep.device, amp_dtype, args.log_interval)[0]

    init = validate()
    traj.add("init", epoch=0, step=0, lr=None, val_loss=init["loss"], val_acc1=init["acc1"], val_acc5=init["acc5"],
             ls_rel_error=ls_error)
    traj.flush()
    _logger.info(f"cfg {run.index} {plan['route']}: init top-1 {init['acc1']:.2f}" +
                 (f" (LS fit error {ls_error:.4f})" if ls_error is not None else " (no LS init)") +
                 f"; {num_epochs} epochs of {steps} steps, lr {lr:.2e}")
    val, train_metrics = init, {"loss": float("nan")}
    for epoch in range(num_epochs):
        epoch_box[0], t_epoch = epoch, time.perf_counter()
        seed_epoch(run.seed, 0, epoch)
        tracked.epoch = [0, 0]
        train_metrics = train_one_epoch(epoch, net, loader, optimizer, tracked, args, ctx)
        lr_used = _lr(optimizer)
        val = validate()
        scheduler.step(epoch + 1 - epoch_offset(args), val["acc1"])
        hits, samples = tracked.epoch
        traj.add("epoch", epoch=epoch + 1, step=ctx.global_step, lr=lr_used, loss=train_metrics["loss"],
                 train_acc1=100.0 * hits / max(samples, 1), val_loss=val["loss"], val_acc1=val["acc1"],
                 val_acc5=val["acc5"], epoch_time=round(time.perf_counter() - t_epoch, 4))
        traj.flush()
        _logger.info(f"cfg {run.index} epoch {epoch + 1}/{num_epochs}: train loss {train_metrics['loss']:.4f}, "
                     f"val top-1 {val['acc1']:.2f}")

    table = cost_table(net, size, prep.in_chans)
    layer_params = sum(p.numel() for p in layer.parameters())
    trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    result = {
        "format": FORMAT, "cfg_id": run.index, "run": plan["name"], "spec_hash": plan["spec_hash"],
        "route": plan["route"], "front": {"label": run.front, **prep.anchor_ids[run.front],
                                          "depth": prep.probe(run.front, size).depth},
        "end": {"label": run.end, **prep.anchor_ids[run.end], "depth": prep.probe(run.end, size).depth},
        "cut": run.cut, "end_block": plan["end_block"], "aligned_end_block": plan["aligned"], "gap": plan["gap"],
        "layer": layer.spec(), "layer_type": run.layer_spec["type"], "ls_init": run.ls_init,
        "ls_images": run.ls_images if run.ls_init else None, "ls_rel_error": ls_error, "loss": run.loss,
        "temperature": run.temperature, "kd_alpha": run.kd_alpha, "seed": run.seed,
        "params": net.params(0), "stitch_layer_params": layer_params, "stitch_layer_trainable_params": trainable,
        "flops": table.route_flops(net.routes[0]), "stitch_layer_flops": table.layer_flops[(0,)],
        "img_size": list(size), "epochs": num_epochs, "steps": ctx.global_step, "lr": lr,
        "train": {**TRAIN_DEFAULTS, **prep.sweep.train}, "data": os.path.abspath(args.data_dir),
        "acc1": val["acc1"], "acc5": val["acc5"], "val_loss": val["loss"], "train_loss": train_metrics["loss"],
        "init_acc1": init["acc1"], "init_acc5": init["acc5"], "init_val_loss": init["loss"],
        "rank": rank, "world_size": world_size, "device": str(prep.device),
        "started": started, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "seconds": round(time.perf_counter() - t0, 3), "trajectory": TRAJECTORY, "checkpoint": LAYER_CKPT}
    save_checkpoint(run_dir / LAYER_CKPT, {"state_dict": layer.state_dict(), "spec": json.dumps(layer.spec()),
                                           "route": plan["route"], "epoch": num_epochs - 1,
                                           "global_step": ctx.global_step, "config": json.dumps(plan["ident"])})
    write_text_atomic(run_dir / RESULT, json.dumps(result, indent=1) + "\n")  # last: the run is finished
    return result


def evaluate_anchor(prep: _Prepared, label: str) -> dict[str, Any]:
    """An anchor on its own (top-1, FLOPs, params), for the results file's reference points."""
    from snnet.core.cost import cost_table
    from snnet.train.data import create_eval_loader
    from snnet.train.engine import evaluate_stitches
    from snnet.core.model import PlainNet
    net = PlainNet(prep.models[label], label)
    data_cfg = prep.data_cfg(label)
    m = evaluate_stitches(net, create_eval_loader(prep.val_ds, prep.args, data_cfg), [0], prep.device,
                          log_interval=prep.args.log_interval)[0]
    size = tuple(data_cfg["input_size"][1:])
    return {"label": label, **prep.anchor_ids[label], "acc1": m["acc1"], "acc5": m["acc5"], "loss": m["loss"],
            "flops": cost_table(net, size, prep.in_chans).route_flops(net.routes[0]), "params": net.params(0),
            "img_size": list(size), "data": os.path.abspath(prep.args.data_dir)}


# ---------------------------------------------------------------------------------------------- the sweep
@dataclass
class SweepSummary:
    out: Path
    results_file: Path | None
    trained: list[int]       # cfg_ids trained by this process now
    skipped: list[int]       # cfg_ids already finished
    elsewhere: list[int]     # cfg_ids another process trains
    records: list[dict[str, Any]]
    anchors: dict[str, Any]  # label -> the (frozen) anchor models used
    plans: list[dict[str, Any]] = field(default_factory=list)  # per run: folder name, route, resolved end block


def _jobs(prep: _Prepared) -> list[tuple[str, Any, Path]]:
    """Runs, then one evaluation per anchor used: (kind, what, the file that marks it done)."""
    out = prep.sweep.out
    jobs = [("run", (run, plan), out / "runs" / plan["name"] / RESULT)
            for run, plan in zip(prep.sweep.runs, prep.plans)]
    for label, ident in prep.anchor_ids.items():
        h = hashlib.sha256(json.dumps({**ident, "data": os.path.abspath(prep.args.data_dir),
                                       "train": {**TRAIN_DEFAULTS, **prep.sweep.train}}, sort_keys=True,
                                      default=str).encode()).hexdigest()[:8]
        jobs.append(("anchor", label, out / "anchors" / f"{label}_{h}.json"))
    return jobs


def collect(prep: _Prepared) -> list[dict[str, Any]]:
    """The results-file records of every finished job: runs as cfg_id = their index, then the anchors."""
    records = []
    for k, (kind, what, done) in enumerate(_jobs(prep)):
        if not done.is_file():
            continue
        r = json.loads(done.read_text())
        if kind == "run":
            records.append({"cfg_id": r["cfg_id"], "flops": r["flops"], "params": r["params"], "acc1": r["acc1"],
                            "acc5": r["acc5"], "loss": r["val_loss"], "route": r["route"], "run": r["run"],
                            "front": r["front"]["label"], "end": r["end"]["label"], "cut": r["cut"],
                            "end_block": r["end_block"], "gap": r["gap"], "layer": layer_label(what[0].layer_spec),
                            "ls_init": r["ls_init"], "objective": r["loss"], "init_acc1": r["init_acc1"],
                            "stitch_layer_params": r["stitch_layer_params"], "seconds": r["seconds"]})
        else:
            records.append({"cfg_id": k, "flops": r["flops"], "params": r["params"], "acc1": r["acc1"],
                            "acc5": r["acc5"], "loss": r["loss"], "route": what, "anchor": what})
    return records


def _world() -> tuple[int, int]:
    """(rank, world size) of a torchrun launch, from its environment (no process group is made for the runs)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _meet(world_size: int) -> None:
    """Under torchrun: wait for every process to finish its jobs (a gloo process group, used once as a barrier)."""
    if world_size <= 1:
        return
    from datetime import timedelta

    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(days=7))
    dist.barrier()


def run_sweep(sweep: Sweep, dry_run: bool = False) -> SweepSummary:
    """Every unfinished job of this process (all of them outside torchrun); the results file at the end."""
    from snnet.core.progress import Progress
    from snnet.results.records import RESULTS_FILE, write_results
    rank, world_size = _world()
    prep = prepare(sweep)
    jobs = _jobs(prep)
    done = [k for k, (_, _, marker) in enumerate(jobs) if marker.is_file()]
    mine = [k for k in range(len(jobs)) if k % world_size == rank and k not in done]
    n = len(sweep.runs)
    summary = SweepSummary(sweep.out, None, [], [k for k in done if k < n],
                           [k for k in range(n) if k % world_size != rank and k not in done], [], prep.models,
                           prep.plans)
    if dry_run:
        summary.records = collect(prep)
        return summary
    sweep.out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        from snnet.core.fileio import write_text_atomic
        listing = {"format": FORMAT, "source": sweep.source, "data": os.path.abspath(prep.args.data_dir),
                   "train": {**TRAIN_DEFAULTS, **sweep.train},
                   "runs": [{"cfg_id": r.index, "run": p["name"], "route": p["route"], "front": r.front,
                             "end": r.end, "cut": r.cut, "end_block": p["end_block"], "gap": p["gap"],
                             "layer": r.layer_spec, "ls_init": r.ls_init, "loss": r.loss, "seed": r.seed}
                            for r, p in zip(sweep.runs, prep.plans)],
                   "anchors": {label: ident for label, ident in prep.anchor_ids.items()}}
        write_text_atomic(sweep.out / SWEEP_JSON, json.dumps(listing, indent=1) + "\n")
    _logger.info(f"{sweep.source}: {n} runs + {len(jobs) - n} anchor evaluations; {len(done)} already done"
                 + (f"; process {rank} of {world_size} takes {len(mine)}" if world_size > 1 else
                    f"; {len(mine)} to do") + f"; output {sweep.out}")
    progress = Progress("Sweep", max(len(mine), 1), 1, unit=None)
    for step, k in enumerate(mine, start=1):
        kind, what, marker = jobs[k]
        t0 = time.perf_counter()
        if kind == "run":
            run, plan = what
            result = train_run(prep, run, plan, marker.parent, rank, world_size)
            summary.trained.append(k)
            extra = f"cfg {k} {plan['route']}: top-1 {result['acc1']:.2f} (init {result['init_acc1']:.2f})"
        else:
            from snnet.core.fileio import write_text_atomic
            result = evaluate_anchor(prep, what)
            write_text_atomic(marker, json.dumps(result, indent=1) + "\n")
            extra = f"anchor {what}: top-1 {result['acc1']:.2f}"
        progress.update(step, 1, f"{extra} in {time.perf_counter() - t0:.1f}s")
        if world_size == 1:  # the results so far, after every job (under torchrun rank 0 writes once, at the end)
            write_results(sweep.out / RESULTS_FILE, collect(prep))
    _meet(world_size)
    summary.records = collect(prep)
    if rank == 0:
        summary.results_file = sweep.out / RESULTS_FILE
        write_results(summary.results_file, summary.records)
    if world_size > 1:
        import torch.distributed as dist
        dist.destroy_process_group()
    return summary


# ---------------------------------------------------------------------------------------------- command line
def _key_value(text: str) -> tuple[str, Any]:
    import ast
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: write key=value, e.g. epochs=3")
    try:
        return key, ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return key, raw


def add_subcommand(sub) -> None:
    """`snnet stitch-train` (snnet/cli.py registers it)."""
    p = sub.add_parser(
        "stitch-train", help="train one stitching layer between two frozen anchors, or a YAML sweep of them",
        description="Front anchor up to block i, a stitching layer, end anchor from block j (any gap); only the "
        "layer trains, the anchors stay frozen in eval mode. Each run writes trajectory.jsonl, stitch_layer.pth.tar "
        "and result.json (last) in its folder; the sweep folder gets stitches_res.txt for snnet pareto. Finished "
        "runs are skipped on rerun. Under torchrun the runs are split across the processes. See "
        "docs/stitch_train.md.")
    p.add_argument("data", nargs="?", metavar="DATA", help="dataset folder with train/ and val/ (overrides the "
                   "sweep's `data`)")
    p.add_argument("--sweep", metavar="YAML", help="a sweep file (e.g. configs/sweeps/digits_3x3.yaml)")
    p.add_argument("--out", metavar="DIR", help="output folder (overrides the sweep's `out`)")
    p.add_argument("--train", type=_key_value, nargs="+", default=[], metavar="FLAG=VALUE",
                   help="train.py flags for every run, e.g. epochs=3 lr=1e-3 img_size=16 (over the sweep's `train`)")
    p.add_argument("--dry-run", action="store_true", help="check everything and list the runs; train nothing")
    one = p.add_argument_group("one run (without --sweep)")
    one.add_argument("--front", metavar="[LABEL=]ANCHOR", help="FILE#INDEX of a stitch config, or a timm name")
    one.add_argument("--end", metavar="[LABEL=]ANCHOR", help="the end anchor, the same way")
    one.add_argument("--cut", type=int, metavar="I", help="the front anchor's last block that runs (flat, from 0)")
    one.add_argument("--end-block", type=int, metavar="J", help="the end anchor's first block that runs")
    one.add_argument("--gap", type=int, metavar="G", help="J minus the block aligned with I (default 0)")
    one.add_argument("--layer", metavar="TYPE", help="stitching-layer type (default linear)")
    one.add_argument("--layer-option", type=_key_value, nargs="+", default=[], metavar="KEY=VALUE",
                     help="stitching-layer options, e.g. rank=8")
    one.add_argument("--no-ls-init", action="store_true", help="train the layer from its random init")
    one.add_argument("--ls-images", type=int, metavar="N", help="images of the least-squares init (default 256)")
    one.add_argument("--loss", choices=("ce", "kd"), help="ce (default) or kd from the end anchor's logits")
    one.add_argument("--temperature", type=float, metavar="T", help="kd temperature (default 1)")
    one.add_argument("--kd-alpha", type=float, metavar="A", help="kd weight (default 1: KL only)")
    one.add_argument("--seed", type=int, metavar="S", help="seed (default 0)")
    one.add_argument("--no-pretrained", action="store_true", help="anchors without a checkpoint start random")
    p.set_defaults(fn=command)


_ONE_RUN = {"front": "--front", "end": "--end", "cut": "--cut", "end_block": "--end-block", "gap": "--gap",
            "layer": "--layer", "ls_images": "--ls-images", "loss": "--loss", "temperature": "--temperature",
            "kd_alpha": "--kd-alpha", "seed": "--seed"}


def _anchor_ref(text: str) -> tuple[str, str]:
    label, sep, ref = text.partition("=")
    if sep and _LABEL.fullmatch(label):
        return label, ref
    file, _, index = text.rpartition("#")
    stem = Path(file).stem if file else text
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", f"{stem}{index}" if file else stem), text


def sweep_from_args(args: argparse.Namespace) -> Sweep:
    """The sweep the command line asks for: --sweep FILE, or one run from the run flags."""
    train = dict(args.train)
    given = [flag for dest, flag in _ONE_RUN.items() if getattr(args, dest) is not None]
    given += [f for f, on in (("--no-ls-init", args.no_ls_init), ("--layer-option", args.layer_option),
                              ("--no-pretrained", args.no_pretrained)) if on]
    if args.sweep:
        if given:
            raise SweepError(f"{', '.join(given)} describe one run; with --sweep put them into the sweep file")
        sweep = load_sweep(args.sweep, args.out, args.data)
        sweep.train.update({k.replace("-", "_"): v for k, v in train.items()})
        for k in sweep.train:
            if k in TRAIN_REFUSED:
                raise SweepError(f"--train {k}: {TRAIN_REFUSED[k]}")
        return sweep
    if not (args.front and args.end and args.cut is not None):
        raise SweepError("give --sweep FILE, or one run: DATA --front ANCHOR --end ANCHOR --cut I [--gap G | "
                         "--end-block J] --out DIR")
    (fl, fref), (el, eref) = _anchor_ref(args.front), _anchor_ref(args.end)
    if fl == el and fref != eref:
        el = f"{el}_end"
    anchors = {fl: fref, el: eref}
    run: dict[str, Any] = {"pair": [fl, el], "cut": args.cut}
    for dest in ("end_block", "gap", "ls_images", "loss", "temperature", "kd_alpha", "seed"):
        if getattr(args, dest) is not None:
            run[dest] = getattr(args, dest)
    if args.layer or args.layer_option:
        run["layer"] = {"type": args.layer or "linear", **dict(args.layer_option)}
    if args.no_ls_init:
        run["ls_init"] = False
    data = {"anchors": anchors, "train": train, "runs": [run], "pretrained": not args.no_pretrained}
    return parse_sweep(data, "stitch-train", Path.cwd(), args.out, args.data)


def _table(summary: SweepSummary) -> str:
    from snnet.results.pareto import human
    rows = ["| cfg_id | route | top-1 | init top-1 | FLOPs | params | layer params | s |",
            "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in summary.records:
        if "run" in r:
            rows.append(f"| {r['cfg_id']} | {r['route']} | {r['acc1']:.2f} | {r['init_acc1']:.2f} | "
                        f"{human(r['flops'])} | {human(r['params'])} | {human(r['stitch_layer_params'])} | "
                        f"{r['seconds']:.0f} |")
        else:
            rows.append(f"| {r['cfg_id']} | {r['route']} (anchor) | {r['acc1']:.2f} | | {human(r['flops'])} | "
                        f"{human(r['params'])} | | |")
    return "\n".join(rows) + "\n"


def command(args: argparse.Namespace) -> int:
    rank, world_size = _world()
    if not logging.getLogger().handlers:
        tag = f" [rank {rank}]" if world_size > 1 else ""
        logging.basicConfig(level=logging.INFO, format=f"%(asctime)s{tag} %(message)s", datefmt="%H:%M:%S")
    sweep = sweep_from_args(args)  # a user error is one line from `snnet`'s one catch (rank 0 only)
    summary = run_sweep(sweep, dry_run=args.dry_run)
    if rank != 0:
        return 0
    n = len(sweep.runs)
    if args.dry_run:
        print(f"{n} runs, {len(summary.skipped)} finished, in {sweep.out}:")
        for r, p in zip(sweep.runs, summary.plans):
            state = "finished" if r.index in summary.skipped else "to do"
            print(f"  cfg {r.index:>3d} {state:<8} {p['route']}  (gap {p['gap']:+d}; runs/{p['name']})")
        return 0
    print(_table(summary), end="")
    print(f"{n} runs: {len(summary.trained)} trained now by this process, {len(summary.skipped)} finished before"
          + (f", {len(summary.elsewhere)} by other processes" if world_size > 1 else "")
          + f"; results {summary.results_file} (plot: snnet pareto {summary.results_file} --out {sweep.out})")
    return 0
