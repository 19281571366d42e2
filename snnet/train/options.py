"""Training's options as typed objects: the optimizer and its LR rule (`OptimOptions`), the LR schedule
(`ScheduleOptions`), the loss (`LossOptions`), the loop (`TrainOptions`) and validation (`EvalOptions`).

Field names and defaults are train.py's flags' (`tests/test_options.py` holds them equal to the parser's), so
train.py builds them from its resolved arguments (`snnet.train.args.options_from`) and every other tool
(stitch-train, a Python caller) builds them directly, by keyword (`options_by_key` checks the keys and value types).
The data layer's own options are `snnet.data.options.DataOptions` and `LoaderOptions`."""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

from snnet.core.errors import UsageError


@dataclass(frozen=True)
class OptimOptions:
    """The optimizer (timm's create_optimizer_v2), its parameter groups and the LR rule (absolute --lr, or
    --lr-base scaled to the global batch)."""
    opt: str = "sgd"
    lr: float | None = None                 # None: lr_base scaled from lr_base_size to the global batch
    lr_base: float = 0.1
    lr_base_size: int = 256
    lr_base_scale: str = ""                 # '' : sqrt for adaptive optimizers (ada*, lamb), else linear
    weight_decay: float = 2e-5
    momentum: float = 0.9
    opt_eps: float | None = None
    opt_betas: tuple[float, ...] | None = None
    layer_decay: float | None = None
    anchor_lr_scale: float | None = None    # None: 1.0
    clip_grad: float | None = None
    clip_mode: str = "norm"
    snnet_compat: bool = False              # SN-Net's parameter groups (docs/snnet_compat.md, C18)


@dataclass(frozen=True)
class ScheduleOptions:
    """The LR schedule (timm's create_scheduler_v2 under train.py's flag names) and its warm-up and floor."""
    sched: str = "cosine"
    epochs: int = 300
    decay_epochs: float = 90
    decay_milestones: tuple[int, ...] = (90, 180, 270)
    decay_rate: float = 0.1
    warmup_epochs: int = 5
    warmup_lr: float = 1e-5
    warmup_prefix: bool = False
    cooldown_epochs: int = 0
    patience_epochs: int = 10
    min_lr: float = 0.0
    scale_warmup_min_lr: bool = False       # scale warmup_lr and min_lr with lr_base (SN-Net's Swin)
    sched_on_updates: bool = False
    lr_one_epoch_late: bool = False


@dataclass(frozen=True)
class LossOptions:
    """The training loss: label smoothing, mixup/cutmix and distillation."""
    smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    cutmix_minmax: tuple[float, ...] | None = None
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    mixup_off_epoch: int = 0
    distillation_type: str = "none"
    distillation_alpha: float = 0.5
    distillation_tau: float = 1.0
    teacher: str = ""
    teacher_checkpoint: str = ""
    no_pretrained: bool = False             # a teacher without checkpoint is random too (no download)
    num_classes: int | None = None


@dataclass(frozen=True)
class TrainOptions:
    """The training loop: batches and accumulation, precision, EMA, compile, seeds, logging and recovery."""
    batch_size: int = 128
    grad_accum_steps: int = 1
    amp: bool = False
    amp_dtype: str = ""                     # '': float16 on CUDA, bfloat16 elsewhere
    no_amp_loss: bool = False
    model_ema: bool = False
    model_ema_decay: float = 0.9998
    model_ema_warmup: bool = False
    torchcompile: str | None = None
    grad_checkpointing: bool = False
    no_prefetcher: bool = False             # batches come on the CPU: the loop moves them
    seed: int = 42
    log_interval: int = 50
    recovery_interval: int = 0
    distributed: bool = False
    dist_bn: str = "reduce"
    freeze_anchors: bool = False
    sample_sync: bool = False
    start_epoch: int | None = None
    no_resume_opt: bool = False
    checkpoint_hist: int = 10
    device: str | None = None               # None: cuda when available, else cpu
    sync_bn: bool = False                   # SyncBatchNorm in a distributed run (main.convert_sync_bn)
    split_bn: bool = False
    channels_last: bool = False


@dataclass(frozen=True)
class EvalOptions:
    """Validation during training and the final evaluation of every stitch."""
    eval_metric: str = "top1"
    val_stitches: tuple[int | str, ...] | None = None   # None: the anchors and a few stitches
    val_interval: int = 1
    save_predictions: str = "anchors"
    log_interval: int = 50


@dataclass(frozen=True)
class InputOptions:
    """What the network is fed: image size, channels and the preprocessing that overrides the model's defaults
    (timm's resolve_data_config reads them)."""
    img_size: int | None = None
    in_chans: int | None = None
    crop_pct: float | None = None
    interpolation: str = ""
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def data_config_args(self) -> dict[str, Any]:
        """The `args` mapping of timm's resolve_data_config."""
        return dataclasses.asdict(self)


#: every option object of a training run (the data layer's are `snnet.data.options`)
TRAINING_OPTIONS = (OptimOptions, ScheduleOptions, LossOptions, TrainOptions, EvalOptions, InputOptions)


class OptionError(UsageError):
    """A key no option object has, or a value of the wrong type (the message names both and the fix)."""


#: the value rules of train.py's flags (its parser's types and choices; tests/test_trainer.py holds them equal), so
#: a tool building options by keyword refuses what train.py would: "positive" (>= 1 for an int, > 0 for a number),
#: "non_negative", "probability" (in [0, 1]), or a tuple of the values allowed
RULES: dict[str, Any] = {
    **dict.fromkeys(("num_classes", "img_size", "in_chans", "batch_size", "validation_batch_size",
                     "grad_accum_steps", "layer_decay", "lr_base_size", "epochs", "recount", "log_interval",
                     "val_interval"), "positive"),
    **dict.fromkeys(("anchor_lr_scale", "weight_decay", "clip_grad", "lr", "lr_base", "warmup_lr", "min_lr", "mixup",
                     "cutmix", "checkpoint_hist", "recovery_interval"), "non_negative"),
    **dict.fromkeys(("distillation_alpha", "hflip", "vflip", "reprob", "mixup_prob", "mixup_switch_prob",
                     "smoothing", "model_ema_decay"), "probability"),
    "distillation_type": ("none", "soft", "hard"), "clip_mode": ("norm", "value", "agc"),
    "lr_base_scale": ("", "linear", "sqrt"), "train_crop_mode": ("rrc", "rkrc", "rkrr", "src"),
    "remode": ("const", "rand", "pixel"), "mixup_mode": ("batch", "pair", "elem"),
    "dist_bn": ("", "reduce", "broadcast"), "amp_dtype": ("", "float16", "bfloat16"),
}


def _broken_rule(key: str, value: Any) -> str | None:
    """What is wrong with `value` under `key`'s rule (None: nothing)."""
    rule = RULES.get(key)
    if rule is None or value is None:
        return None
    if isinstance(rule, tuple):
        return None if value in rule else f"{value!r} is not one of {', '.join(map(repr, rule))}"
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    if not math.isfinite(value):
        return f"{value!r} is not a finite number"
    if rule == "positive" and isinstance(value, int) and value < 1:
        return f"{value} is not >= 1"
    if rule == "positive" and not value > 0:
        return f"{value} is not > 0"
    if rule == "non_negative" and not value >= 0:
        return f"{value} is not >= 0"
    if rule == "probability" and not 0 <= value <= 1:
        return f"{value} is not a probability in [0, 1]"
    return None


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", tuple: "a list"}


def _allowed(hint: Any) -> tuple[Any, ...]:
    """The concrete types a field's annotation admits (NoneType included for an optional field)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(t for a in typing.get_args(hint) for t in _allowed(a))
    return (typing.get_origin(hint) or hint,)


def checked_value(key: str, value: Any, hint: Any, where: str) -> Any:
    """`value` as the type the field's annotation `hint` says (an int for a float field, a YAML list for a tuple
    and a numeric string for a number are taken as they are meant) and within its rule (`RULES`); anything else is
    an `OptionError` naming the key, the value and what it must be."""
    value = _typed(key, value, hint, where)
    items = value if isinstance(value, tuple) else (value,)
    wrong = next(filter(None, (_broken_rule(key, v) for v in items)), None)
    if wrong is not None:
        raise OptionError(f"{where} key {key!r}: {wrong} (as for train.py's --{key.replace('_', '-')}); fix the value")
    return value


def _typed(key: str, value: Any, hint: Any, where: str) -> Any:
    allowed = _allowed(hint)
    if Any in allowed:
        return value
    if value is None:
        if type(None) in allowed:
            return None
    elif isinstance(value, bool):  # before int: a bool is an int to Python, not to a reader
        if bool in allowed:
            return value
    elif isinstance(value, int) and (int in allowed or float in allowed):
        return value if int in allowed else float(value)
    elif isinstance(value, float) and float in allowed:
        return value
    elif isinstance(value, (list, tuple)) and tuple in allowed:
        return tuple(value)
    elif isinstance(value, str):
        if str in allowed:
            return value
        for kind in (int, float):  # a number written as a string (YAML 1.1 reads 1e-3 as one)
            if kind in allowed:
                try:
                    return kind(value)
                except ValueError:
                    pass
    words = " or ".join(_TYPE_WORDS.get(t, "null" if t is type(None) else getattr(t, "__name__", str(t)))
                        for t in allowed)
    raise OptionError(f"{where} key {key!r}: {value!r} is not {words}; give {key} {words}")


def options_by_key(classes: typing.Iterable[type], values: dict[str, Any], where: str,
                   **given: Any) -> dict[type, Any]:
    """{class: instance} of option dataclasses from keyword `values` (train.py's flag names): each key goes to
    every class with a field of its name, checked against that field's type; a key no class has is an
    `OptionError` naming it (with the closest names). `given`: values the tool sets itself (not checked, and
    passed only to classes with that field)."""
    classes = list(classes)
    fields = {f.name: cls for cls in classes for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k not in fields]
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(fields), n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "use one of train.py's flags (dashes as underscores)"
        raise OptionError(f"{where}: unknown key {unknown[0]!r}; {hint}")
    out = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        out[cls] = cls(**{k: checked_value(k, v, hints[k], where) for k, v in values.items() if k in names},
                       **{k: v for k, v in given.items() if k in names})
    return out
