"""Stitch configs: SN-Net's JSON files accepted as they are, plus this project's own fields.

Every field has a type; a field nobody knows is an error that names it (SN-Net silently ignored such typos).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import typing
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from snnet.utils.errors import SNNetError
from snnet.utils.options import (
    DATASET,
    DEVICE,
    MODEL,
    OUTPUT,
    SCHEDULE,
    STITCHING,
    Flag,
    flag_of,
    option,
    rule_violation,
)


class ConfigError(SNNetError):
    """A stitch config that cannot be used; the message names the value and the fix."""


@dataclass(frozen=True)
class ConfigFlags:
    """train.py's options that a stitch config's field sets the default of (`FIELDS`' dest column), declared here
    once, in the lowest layer, so that the config reads a field's type, rule, choices and meaning from its flag's
    declaration: train.py's option objects copy these fields (`shared(CONFIG_FLAGS["epochs"])` in
    `snnet.train.options` and `snnet.data.options`). Never built: its fields are declarations."""
    data: str | None = option(None, nargs="?", metavar="DIR", group=DATASET,
                              help="path to dataset (ImageFolder: train/ and val/ or validation/); a stitch config's "
                                   "data_path is its default")
    dataset: str = option("", "--dataset", group=DATASET,
                          help="dataset type + name ('<type>/<name>', e.g. torch/cifar10); '' is ImageFolder or "
                               "ImageTar (SN-Net's data_set IMNET)")
    batch_size: int = option(128, "-b", "--batch-size", rule="positive", group=MODEL,
                             help="Input batch size for training, per process")
    num_classes: int | None = option(None, "--num-classes", rule="positive", group=MODEL,
                                     help="number of label classes (default: the dataset's class folders, else the "
                                          "stitch config's num_classes)")
    img_size: int | None = option(None, "--img-size", rule="positive", group=MODEL,
                                  help="Image size (default: the model's)")
    workers: int = option(4, "-j", "--workers", rule="non_negative", group=DEVICE,
                          help="how many data loading worker processes to use, per training process (default: "
                               "timm's 4, at most the usable cores)")
    lr_base: float = option(0.1, "--lr-base", rule="non_negative", group=SCHEDULE,
                            help="base learning rate: lr = lr_base * global_batch_size / lr_base_size. A stitch "
                                 "config's lr (SN-Net's LR per 512 images) becomes this default with --lr-base-size "
                                 "512 and --lr-base-scale linear, so with such a config a typed --lr-base is per 512 "
                                 "images too, unless --lr-base-size is typed")
    epochs: int = option(300, "--epochs", rule="positive", group=SCHEDULE, help="number of epochs to train")
    warmup_lr: float = option(1e-5, "--warmup-lr", rule="non_negative", group=SCHEDULE, help="warmup learning rate")
    min_lr: float = option(0.0, "--min-lr", rule="non_negative", group=SCHEDULE,
                           help="lower lr bound for cyclic schedulers that hit 0")
    distillation_type: str = option("none", "--distillation-type", choices=("none", "soft", "hard"), group=STITCHING,
                                    help="DeiT distillation from --teacher: none, soft (KL divergence) or hard "
                                         "(teacher's labels)")
    teacher: str = option("", "--teacher", metavar="NAME", group=STITCHING,
                          help="distillation teacher: a timm name, or a stitch config anchor's \"label\"")
    ls_mode: str | None = option(None, "--ls-mode", choices=("joint", "average", "snnet"), group=STITCHING,
                                 help="least-squares init: joint (shared layers fitted to all their positions, eval "
                                      "mode, clean images), average (SN-Net's mean of per-position solutions, "
                                      "otherwise as joint) or snnet (SN-Net's init exactly: the first augmented, "
                                      "mixed-up training batch of stitch_init_bs images per process, train mode, "
                                      "float32 pinv per position, averaged; rank 0's result kept) (default: the "
                                      "stitch config's ls_mode, joint)")
    stitch_init_bs: int | None = option(None, "--stitch-init-bs", rule="positive", group=STITCHING,
                                        help="images for the least-squares init (default: the stitch config's "
                                             "stitch_init_bs, 100)")
    experiment: str = option("", "--experiment", group=OUTPUT,
                             help="name of train experiment, name of sub-folder for output ('' = "
                                  "<date>-<model>-<img size>)")


#: dest -> the declaration of a flag a stitch config sets (a dataclass field: `shared` copies it into an option object)
CONFIG_FLAGS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(ConfigFlags)}
_JSON_TYPES = {int: (int,), float: (int, float), str: (str,), bool: (bool,)}


class Field(NamedTuple):
    types: tuple[type, ...]  # accepted JSON types
    default: Any  # used by StitchConfig.get when the file leaves the field out
    meaning: str
    dest: str | None = None  # train.py flag (argparse dest) whose default the field sets; None: read by the model
    flag: Flag | None = None  # that flag's declaration (its rule and choices check the field's value)


def _sets(dest: str, default: Any = None) -> Field:
    """The field of a stitch config that sets train.py's `dest` (a `ConfigFlags` declaration): its JSON type, meaning,
    rule and choices are the flag's. `default`: what `StitchConfig.get` gives when the file leaves the field out
    (None: the flag's own default applies, set by train.py's parser)."""
    declared = CONFIG_FLAGS[dest]
    hint = typing.get_type_hints(ConfigFlags)[dest]
    value_types = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
    flag = flag_of(declared)
    assert flag is not None and len(value_types) == 1 and declared.default is not MISSING
    return Field(_JSON_TYPES[value_types[0]], default, flag.help, dest, flag)


#: The one table of stitch-config fields. The first block is SN-Net's config/deit_stitching.json and the CNN family's
#: {"anchors": [...]}; the rest are ours. A field that sets a train.py flag's default is `_sets(dest)`: its type,
#: rule, choices and meaning are that flag's declaration (`ConfigFlags`). train.py's rules for dests
#: (snnet/train/args.py): lr is a base LR per 512 images, data_set IMNET is timm's folder dataset ''.
FIELDS: dict[str, Field] = {
    "anchors": Field((list,), None, "timm model names, or {'name': ..., 'checkpoint': path}, small to large"),
    "model": Field((str,), "snnet", "SN-Net's model name (informational)"),
    "batch_size": _sets("batch_size"),
    "data_path": _sets("data"),
    "data_set": _sets("dataset"),
    "exp_name": _sets("experiment"),
    "input_size": _sets("img_size"),
    "num_workers": _sets("workers"),
    "lr": _sets("lr_base"),
    "warmup_lr": _sets("warmup_lr"),
    "min_lr": _sets("min_lr"),
    "epochs": _sets("epochs"),
    "fulltune": Field((bool,), True, "train the anchors too; false trains only stitching layers and class tokens"),
    "ls_init": Field((bool,), True, "least-squares initialise the stitching layers"),
    "nearest_stitching": Field((bool,), True, "plain ViTs: stitch only neighbouring anchors"),
    "stitch_stride": Field((int,), 1, "plain ViTs: sliding-window stride"),
    "stitch_kernel_size": Field((int,), 2, "plain ViTs: sliding-window size"),
    "stitch_init_bs": _sets("stitch_init_bs", 100),
    "distillation_type": _sets("distillation_type"),
    "teacher_model": _sets("teacher"),
    # ours
    "ls_mode": _sets("ls_mode", "joint"),
    "skip_final_norm": Field((bool,), None, "stitched plain-ViT routes skip the end anchor's final norm (SN-Net: "
                             "true)"),
    "stitch_stages": Field((list,), None, "hierarchical families: stages to stitch (family default if absent)"),
    "num_classes": _sets("num_classes"),
    "recipe": Field((dict,), None, "the training recipe: train.py flag names (- or _) -> values, as in a -c YAML; "
                    "same layer as the fields above (a flag set twice is an error)"),
    "stitch_plan": Field((str,), "sliding_window", "sliding_window (SN-Net: the smaller anchor in front), two_way "
                         "(SN-Netv2: two plain ViTs, both directions and two-hop routes; hierarchical anchors: every "
                         "stitched stage both ways, one hop) or large_to_small (hierarchical anchors: the larger "
                         "anchor in front only)"),
    "stitch_layer": Field((dict,), None, "stitching-layer type and options, e.g. {\"type\": \"linear\"} (default)"),
    "bn_stats": Field((str,), "shared", "BatchNorm running statistics of an anchor's blocks after a stitch: shared "
                      "(SN-Net's: the anchor's own, updated by every route) or per_stitch (each stitch keeps its "
                      "own, so the anchors keep theirs)"),
    "sampler": Field((dict,), None, "stitch sampler type and options, e.g. {\"type\": \"uniform\"} (default, "
                     "SN-Net's)"),
    "train_exclude": Field((list,), None, "cfg_ids that are built and evaluated but never drawn in training (the "
                           "sampler, and its FLOPs buckets, skip them; SN-Netv2 never trained its id 13)"),
    "snnet_stitch_bias_decay": Field((bool,), False, "with --snnet-compat, the stitching layers' biases are "
                                     "weight-decayed too (SN-Net's Swin optimizer did; its other families did not)"),
    "drop_path_schedule": Field((str,), "linear", "linear (timm: the rate ramps from 0 at the first block to the "
                                "anchor's drop_path_rate at the last) or constant (SN-Netv2: that rate in every "
                                "block)"),
    "positions": Field((dict,), None, "plain ViTs: stitch positions instead of the sliding window, per neighbouring "
                       "anchor pair, one stitching layer each: {\"select\": \"cka\"|\"ls\"|\"kl\", \"per_pair\": K} "
                       "(the K best of the compatibility map on the LS-init images; train.py writes the choice to "
                       "<output>/stitch_plan.json) or {\"pairs\": [[[j, k], ...], ...]} (explicit; docs/"
                       "stitch_anything.md)"),
    "description": Field((str,), None, "free text"),
}
#: field -> the train.py argparse dest it sets the default of
ARG_DESTS: dict[str, str] = {name: f.dest for name, f in FIELDS.items() if f.dest}
ANCHOR_FIELDS = {"name": str, "checkpoint": str, "model_kwargs": dict, "label": str}
#: what each anchor field means (docs/stitch_config.md is generated from this and `FIELDS`)
ANCHOR_MEANINGS = {
    "name": "timm model name (timm.list_models); a plain string anchor is this alone",
    "checkpoint": "a weights file of this model (a train.py checkpoint, a timm/torch state dict) loaded instead of "
                  "timm's pretrained weights",
    "model_kwargs": "extra timm.create_model arguments, e.g. {\"embed_dim\": 96, \"depth\": 6} (train.py's "
                    "--model-kwargs apply to every anchor over these)",
    "label": "the anchor's name in routes, results, tables and plots (default: the timm name)",
}
#: an anchor's label is a route name: what `snnet.results.pareto.parse_route` reads as one, without the '#' of the
#: labels made for repeated timm names
_LABEL = re.compile(r"[A-Za-z0-9_.+-]+")


@dataclass(frozen=True)
class AnchorSpec:
    name: str
    checkpoint: str | None = None
    model_kwargs: dict = field(default_factory=dict, hash=False)  # extra timm.create_model arguments
    label: str | None = None  # the anchor's name in routes, results and plots (default: the timm name, see labels())


@dataclass
class StitchConfig:
    anchors: list[AnchorSpec]
    values: dict[str, Any] = field(default_factory=dict)  # every other field given in the file
    path: str | None = None

    def with_model_kwargs(self, overrides: dict[str, Any]) -> StitchConfig:
        """A copy whose every anchor takes `overrides` (``--model-kwargs``) over its own ``model_kwargs``: what the
        user types applies to all anchors and wins."""
        if not overrides:
            return self
        anchors = [AnchorSpec(a.name, a.checkpoint, {**a.model_kwargs, **overrides}, a.label) for a in self.anchors]
        return StitchConfig(anchors, dict(self.values), self.path)

    def labels(self) -> list[str]:
        """Each anchor's name in routes, results files, tables and plots: its ``"label"`` where the config gives
        one, else its timm name, with ``#index`` where several anchors share that name (deit_tiny_patch16_224#0)."""
        names = [a.name for a in self.anchors]
        return [a.label or (f"{n}#{i}" if names.count(n) > 1 else n)
                for i, (a, n) in enumerate(zip(self.anchors, names))]

    def labelled(self) -> dict[str, AnchorSpec]:
        """The anchors that have a ``"label"``, by label (what ``--teacher`` may name)."""
        return {a.label: a for a in self.anchors if a.label}

    def get(self, name: str, default: Any = None) -> Any:
        if name in self.values:
            return self.values[name]
        spec_default = FIELDS[name].default
        return default if spec_default is None else spec_default


def parse_stitch_config(data: Any, source: str = "stitch config") -> StitchConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object with an 'anchors' list, got {type(data).__name__}")
    unknown = [k for k in data if k not in FIELDS]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, FIELDS, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"{source}: unknown field(s) {', '.join(hints)}; known fields: {', '.join(FIELDS)}; "
                          f"train.py flags go in the 'recipe' object")
    for k, v in data.items():
        types = FIELDS[k].types
        ok = isinstance(v, types) and not (isinstance(v, bool) and bool not in types)
        if not ok:
            names = " or ".join(t.__name__ for t in types)
            raise ConfigError(f"{source}: field {k!r} must be {names}, got {v!r}")
    if "anchors" not in data:
        raise ConfigError(f"{source}: missing field 'anchors' (a list of timm model names, small to large)")
    anchors = [_parse_anchor(a, i, source) for i, a in enumerate(data["anchors"])]
    if not anchors:
        raise ConfigError(f"{source}: 'anchors' is empty; list at least one timm model name")
    labels = StitchConfig(anchors).labels()
    repeated = sorted({x for x in labels if labels.count(x) > 1})
    if repeated:
        raise ConfigError(f"{source}: anchors share the label(s) {repeated}; give each anchor its own 'label'")
    for k in ("stitch_stride", "stitch_kernel_size"):
        if k in data and data[k] < 1:
            raise ConfigError(f"{source}: field {k!r} must be >= 1, got {data[k]!r}")
    for k, v in data.items():  # a field that sets a flag: the flag's choices and rule, as if it had been typed
        flag = FIELDS[k].flag
        if flag is None:
            continue
        wrong = f"{v!r} is not one of {', '.join(map(repr, flag.choices))}" \
            if flag.choices is not None and v not in flag.choices else rule_violation(flag.rule, v)
        if wrong is not None:  # worded as train.py's refusal of a file's value (snnet/train/args.py)
            raise ConfigError(f"{source}: field {k!r}: {wrong} (as for {'/'.join(flag.names) or flag.metavar}); fix "
                              f"the value in the file")
    if data.get("stitch_plan", "sliding_window") not in ("sliding_window", "two_way", "large_to_small"):
        raise ConfigError(f"{source}: field 'stitch_plan' must be 'sliding_window', 'two_way' or 'large_to_small', got "
                          f"{data['stitch_plan']!r}")
    if data.get("drop_path_schedule", "linear") not in ("linear", "constant"):
        raise ConfigError(f"{source}: field 'drop_path_schedule' must be 'linear' (timm) or 'constant' (SN-Netv2), "
                          f"got {data['drop_path_schedule']!r}")
    stages = data.get("stitch_stages")
    if stages is not None and not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in stages):
        raise ConfigError(f"{source}: field 'stitch_stages' must be a list of stage indices >= 0, got {stages!r}")
    excluded = data.get("train_exclude")
    if excluded is not None and not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in excluded):
        raise ConfigError(f"{source}: field 'train_exclude' must be a list of cfg_ids >= 0 (routes never drawn in "
                          f"training), got {excluded!r}")
    for k in ("stitch_layer", "sampler"):  # the registries check the names when the network is built
        if k in data and not isinstance(data[k].get("type", ""), str):
            raise ConfigError(f"{source}: field {k!r} needs a 'type' name, e.g. {{\"type\": \"linear\"}}, got "
                              f"{data[k]!r}")
    if "positions" in data:
        _check_positions(data, source)
    values = {k: v for k, v in data.items() if k != "anchors"}
    return StitchConfig(anchors, values)


#: "positions": {"select": score, ...} -> the scores a selection may rank by (snnet/train/positions.py)
POSITION_SCORES = ("cka", "ls", "kl")
POSITION_KEYS = ("select", "per_pair", "pairs", "from")


def _check_positions(data: dict, source: str) -> None:
    """The "positions" field: exactly one of a selection request and explicit positions, and no sliding-window
    field beside it (ranges against the anchors' depth are checked when the plan is built)."""
    pos = data["positions"]
    where = f"{source}: field 'positions'"
    unknown = [k for k in pos if k not in POSITION_KEYS]
    if unknown:
        raise ConfigError(f"{where} has unknown key(s) {unknown}; use {{\"select\": \"kl\", \"per_pair\": K}} or "
                          f"{{\"pairs\": [[[j, k], ...], ...]}}")
    if ("select" in pos) == ("pairs" in pos):
        raise ConfigError(f"{where} needs exactly one of 'select' (e.g. {{\"select\": \"kl\", \"per_pair\": 4}}) and "
                          f"'pairs' (explicit [j, k] lists, one per neighbouring anchor pair), got {pos!r}")
    if "select" in pos:
        if pos["select"] not in POSITION_SCORES:
            raise ConfigError(f"{where}: 'select' must be one of {', '.join(POSITION_SCORES)}, got {pos['select']!r}")
        k = pos.get("per_pair")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"{where}: 'per_pair' must be an integer >= 1 (positions chosen per anchor pair), got "
                              f"{k!r}")
    else:
        if "per_pair" in pos:
            raise ConfigError(f"{where}: 'per_pair' goes with 'select', not with explicit 'pairs'; remove it")
        pairs = pos["pairs"]
        ok = isinstance(pairs, list) and all(
            isinstance(plist, list) and all(isinstance(p, list) and len(p) == 2 and all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in p) for p in plist)
            for plist in pairs)
        if not ok:
            raise ConfigError(f"{where}: 'pairs' must be one list per neighbouring anchor pair of [j, k] block "
                              f"indices >= 0, e.g. [[[0, 1], [1, 1]]] for two anchors, got {pairs!r}")
    if "from" in pos and not isinstance(pos["from"], dict):
        raise ConfigError(f"{where}: 'from' (how the positions were selected; informational) must be an object, got "
                          f"{pos['from']!r}")
    clash = [k for k in ("stitch_kernel_size", "stitch_stride") if k in data]
    if data.get("nearest_stitching") is False:
        clash.append("nearest_stitching")
    if data.get("stitch_plan", "sliding_window") != "sliding_window":
        clash.append("stitch_plan")
    if clash:
        raise ConfigError(f"{where} replaces the sliding window of neighbouring anchors; remove {', '.join(clash)} "
                          f"(or remove 'positions')")


def _parse_anchor(a: Any, i: int, source: str) -> AnchorSpec:
    if isinstance(a, str) and a:
        return AnchorSpec(a)
    if isinstance(a, dict):
        unknown = [k for k in a if k not in ANCHOR_FIELDS]
        if unknown:
            raise ConfigError(f"{source}: anchor {i} has unknown field(s) {unknown}; use {', '.join(ANCHOR_FIELDS)}")
        for k, t in ANCHOR_FIELDS.items():
            if k in a and not isinstance(a[k], t):
                raise ConfigError(f"{source}: anchor {i} field {k!r} must be a {t.__name__}, got {a[k]!r}")
        if not a.get("name"):
            raise ConfigError(f"{source}: anchor {i} needs a 'name' (a timm model name)")
        label = a.get("label")
        if label is not None and not _LABEL.fullmatch(label):
            raise ConfigError(f"{source}: anchor {i} label {label!r} is not a route name; use letters, digits and "
                              f"'_.+-' only, e.g. \"w16\"")
        return AnchorSpec(a["name"], a.get("checkpoint"), dict(a.get("model_kwargs", {})), label)
    raise ConfigError(f"{source}: anchor {i} must be a timm model name or {{'name': ..., 'checkpoint': ...}}, "
                      f"got {a!r}")


class _JSONValueError(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise _JSONValueError(f"key(s) {', '.join(map(repr, repeated))} given twice in one object (JSON keeps only "
                              f"the last); keep one")
    return dict(pairs)


def _no_constant(name: str) -> Any:
    raise _JSONValueError(f"{name} is not a number here (JSON has no NaN or Infinity); write a finite number")


def load_stitch_config(path: str | os.PathLike) -> StitchConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"stitch config {str(path)!r} does not exist; pass an existing JSON file "
                          f"(see configs/)")
    try:
        data = json.loads(path.read_text(), object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"stitch config {str(path)!r} is not valid JSON ({e}); fix the file") from None
    except _JSONValueError as e:  # strict JSON: a repeated key or NaN/Infinity would be silently accepted
        raise ConfigError(f"stitch config {str(path)!r}: {e}; fix the file") from None
    cfg = parse_stitch_config(data, f"stitch config {str(path)!r}")
    cfg.path = str(path)
    cfg.anchors = [AnchorSpec(a.name, anchor_checkpoint(a.checkpoint, path), a.model_kwargs, a.label)
                   for a in cfg.anchors]
    return cfg


def anchor_checkpoint(checkpoint: str | None, config: Path) -> str | None:
    """Where a config's relative anchor checkpoint is (docs/robustness.md): relative to the config file's folder, so
    configs travel with their anchors; only where no file is there, relative to the working directory (configs/ of
    this repository name the demo's anchors from the repository root). Both existing as different files: refused,
    naming both (a stray file in the working directory must not silently win, nor lose)."""
    if checkpoint is None or Path(checkpoint).is_absolute():
        return checkpoint
    beside, here = config.parent / checkpoint, Path(checkpoint)
    if beside.exists() and here.exists() and not os.path.samefile(beside, here):
        raise ConfigError(f"stitch config {str(config)!r}: anchor checkpoint {checkpoint!r} names two different files, "
                          f"{str(beside)!r} (relative to the config's folder, the rule) and {str(here.resolve())!r} "
                          f"(relative to the working directory); write an absolute path, or remove the file that "
                          f"is not meant")
    return str(beside) if beside.exists() or not here.exists() else checkpoint


# ---------------------------------------------------------------------------------------------------- anchor specs
#: timm names that carry a colon of their own (hub references); NAME:CHECKPOINT splits after them
_HUB_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:")


def parse_anchor(value: Any, source: str = "anchor", base: str | os.PathLike | None = None) -> AnchorSpec:
    """The one anchor syntax of every tool (``--anchors``, ``--front``/``--end``, sweep files, configs):

    * ``NAME``: a timm model name (``resnet18``, ``vit_small_patch16_224.augreg_in21k``, ``hf-hub:org/model``);
    * ``NAME:CHECKPOINT``: the model with local weights;
    * ``FILE#INDEX``: anchor INDEX of a stitch config file;
    * a config's JSON anchor object, as text or a dict: ``{"name": ..., "checkpoint": ..., "model_kwargs": {...}}``.

    Relative checkpoint and config paths are taken from `base` when given. Raises ConfigError naming `source`."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            try:
                value = json.loads(text)
            except ValueError as e:
                raise ConfigError(f"{source} {text!r} is not a JSON object ({e}); write NAME, NAME:CHECKPOINT, "
                                  f"FILE#INDEX or an anchor object such as '{{\"name\": \"resnet18\"}}'") from None
        elif "#" in text:
            file, _, index = text.rpartition("#")
            if not index.isdigit() or not file:
                raise ConfigError(f"{source} {text!r} must be FILE#INDEX (an anchor of a stitch config), e.g. "
                                  f"configs/demo_digits.json#0")
            cfg = load_stitch_config(_based(file, base))
            if int(index) >= len(cfg.anchors):
                raise ConfigError(f"{source} {text!r}: {file!r} has anchors 0..{len(cfg.anchors) - 1}, not {index}; "
                                  f"fix the index")
            return cfg.anchors[int(index)]
        else:
            hub = next((p for p in _HUB_PREFIXES if text.startswith(p)), "")
            name, sep, checkpoint = text[len(hub):].partition(":")
            if sep and not checkpoint:
                raise ConfigError(f"{source} {text!r} names no checkpoint after ':'; write NAME or NAME:CHECKPOINT")
            value = {"name": hub + name, "checkpoint": checkpoint} if sep else hub + name
    if isinstance(value, dict) and isinstance(value.get("checkpoint"), str):
        value = {**value, "checkpoint": _based(value["checkpoint"], base)}
    return parse_stitch_config({"anchors": [value]}, source).anchors[0]


def _based(path: str, base: str | os.PathLike | None) -> str:
    p = Path(os.path.expanduser(path))
    return str(p if p.is_absolute() or base is None else Path(base) / p)


#: stitch-config fields that define the network without changing a state-dict shape (or its keys): a checkpoint
#: loaded under other values would load cleanly and run another network
NETWORK_FIELDS = ("skip_final_norm", "nearest_stitching", "stitch_kernel_size", "stitch_stride", "stitch_plan",
                  "stitch_stages", "stitch_layer", "positions")


def recorded_stitch_config(state: dict[str, Any], source: str):
    """The stitch config a train.py checkpoint recorded (anchors and the config's fields, as JSON text), or None for a
    checkpoint that records none (SN-Net's, converted). ConfigError when it cannot be parsed."""
    ident = state.get("config")
    ident = json.loads(ident) if isinstance(ident, str) else ident
    if not isinstance(ident, dict) or not isinstance(ident.get("anchors"), list) or \
            not all(isinstance(a, dict) for a in ident["anchors"]):
        return None
    anchors = [{k: v for k, v in a.items() if v is not None} for a in ident["anchors"]]
    return parse_stitch_config({"anchors": anchors, **(ident.get("stitch_config") or {})},
                               f"the stitch config recorded in {source}")


def network_differences(given, recorded) -> list[str]:
    """What makes `given` (a StitchConfig) build another network than `recorded` does: anchors (names, model_kwargs;
    not their weight files) and the `NETWORK_FIELDS`, as 'field: given vs recorded'. Positions a config still selects
    from data are not compared (selection on the same anchors and images gives the recorded ones)."""
    out = []
    ours = [(a.name, a.model_kwargs) for a in given.anchors]
    theirs = [(a.name, a.model_kwargs) for a in recorded.anchors]
    if ours != theirs:
        out.append(f"anchors: {ours} vs {theirs}")
    for name in NETWORK_FIELDS:
        if name == "positions" and "select" in (given.get("positions") or {}):
            continue
        if given.get(name) != recorded.get(name):
            out.append(f"{name}: {given.get(name)!r} vs {recorded.get(name)!r}")
    return out


def check_same_network(given, state: dict[str, Any], checkpoint: str, config: str, fix: str) -> None:
    """Refuse (ConfigError) a config `given` that builds another network than the one checkpoint `state` recorded
    (`network_differences`); a checkpoint that records none passes. `config` names the given config, `fix` ends the
    message (what the user should pass)."""
    recorded = recorded_stitch_config(state, repr(checkpoint))
    differences = network_differences(given, recorded) if recorded is not None else []
    if differences:
        raise ConfigError(f"checkpoint {checkpoint!r} was trained as another network than --stitch_config "
                          f"{config!r} builds ({'; '.join(differences)}, given vs recorded); {fix}")
