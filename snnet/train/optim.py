"""Optimizer and LR schedule of a run: parameter groups, the LR rule, timm's optimizer and scheduler factories."""
from __future__ import annotations

import difflib
from typing import Any, NamedTuple

import torch
from timm.models import group_parameters
from timm.optim import create_optimizer_v2, list_optimizers
from timm.optim._param_groups import auto_group_layers
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from torch import nn

from snnet.train.options import OptimOptions, RunOptions, ScheduleOptions
from snnet.utils.errors import SNNetError, UsageError


class OptimError(SNNetError):
    """An optimizer or schedule that cannot be built; the message names the flag and the fix."""


def param_groups(net: nn.Module, weight_decay: float, anchor_lr_scale: float, decay_all: bool = False,
                 layer_decay: float | None = None, decay_stitch_biases: bool = False) -> list[dict]:
    """Anchors vs. stitching layers (LR scale), each split into decay / no-decay (1-D params, biases, the anchors'
    own no_weight_decay names, which SN-Net dropped: `decay_all` does too, docs/snnet_compat.md, C18).
    `decay_stitch_biases` decays every stitching-layer parameter, biases included, as SN-Net's Swin optimizer
    (``set_weight_decay_stitch``) did; its other families left biases undecayed (docs/snnet_compat.md, C18).

    With `layer_decay` (``--layer-decay``) an anchor parameter's LR scale is ``anchor_lr_scale * layer_decay **
    (depth - layer_id)`` within its anchor (`layer_ids`), so groups are (anchor/stitch, decay/no-decay, scale).
    Stitching layers keep scale 1: they are new layers between two anchors, with no pretrained features to protect
    and no single depth (a stitch sits at block j of one anchor and block k of another)."""
    skip = net.no_weight_decay() if hasattr(net, "no_weight_decay") and not decay_all else set()
    depth_scale = {}
    if layer_decay is not None:
        depth_scale = {name: layer_decay ** (depth - lid) for name, (lid, depth) in layer_ids(net).items()}
    groups: dict[tuple[bool, bool, float], list] = {}
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        is_anchor = net.is_anchor_parameter(name) if hasattr(net, "is_anchor_parameter") else \
            not name.startswith("stitch_layers.")
        no_decay = (p.ndim <= 1 or name.endswith(".bias") or name in skip) and not (decay_stitch_biases and
                                                                                  not is_anchor)
        scale = anchor_lr_scale * depth_scale.get(name, 1.0) if is_anchor else 1.0
        groups.setdefault((is_anchor, no_decay, scale), []).append(p)
    out = []
    for (_is_anchor, no_decay, scale), params in sorted(groups.items()):
        out.append({"params": params, "weight_decay": 0.0 if no_decay else weight_decay, "lr_scale": scale})
    return out


def layer_ids(net: nn.Module) -> dict[str, tuple[int, int]]:
    """{parameter name: (layer_id, depth)} of the anchors' parameters, per anchor: 0 for the stem unit, 1..n for its
    n blocks in execution order, depth = n + 1 for the final norm and the head (and parameters no unit runs). A
    transition (downsampling) unit takes the id of the block after it, as timm's group matchers put a stage's
    downsample with its first block. A network whose one timm model runs whole (``--model``) uses timm's own layer
    grouping (group_matcher), as timm's layer decay does."""
    out = {}
    for a, units in enumerate(net.units):
        anchor, prefix = net.anchor(a), net._anchor_prefix(a)
        n = sum(u.kind == "block" for u in units)
        if n == 0:
            layer_map = (group_parameters(anchor, anchor.group_matcher(coarse=False), reverse=True)
                         if hasattr(anchor, "group_matcher") else auto_group_layers(anchor))
            depth = max(layer_map.values())
            out.update({prefix + name: (layer_map.get(name, depth), depth) for name, _ in anchor.named_parameters()})
            continue
        ids, block = [], 0
        for u in units:
            block += u.kind == "block"
            ids.append(0 if u.kind == "stem" else block if u.kind == "block" else block + 1 if u.kind == "transition"
                       else n + 1)
        for name, _ in anchor.named_parameters():
            lid = next((i for u, i in zip(units, ids) if any(name == m or name.startswith(m + ".") for m in u.modules)),
                       n + 1)
            out[prefix + name] = (min(lid, n + 1), n + 1)
    return out


class LearningRates(NamedTuple):
    """A run's global batch and the learning rates it resolves to (`resolve_lrs`)."""
    global_batch: int  # images per optimizer step, over every process: -b x processes x --grad-accum-steps
    lr: float
    warmup_lr: float
    min_lr: float


def resolve_lrs(options: RunOptions, world_size: int) -> LearningRates:
    """The run's global batch and (lr, warmup_lr, min_lr), the one place they are computed (`resolve.resolve` calls
    it once; the preflight's checks, --dry-run and the trainer read the resolved options). --lr is absolute
    (timm); else --lr-base is scaled from --lr-base-size to the global batch (linearly, or by the square root for
    adaptive optimizers unless --lr-base-scale says), and with --scale-warmup-min-lr so are --warmup-lr and --min-lr
    (SN-Net's Swin)."""
    optim, schedule, train = options.optim, options.schedule, options.train
    global_batch = train.batch_size * world_size * max(1, train.grad_accum_steps or 1)
    if optim.lr is not None:
        return LearningRates(global_batch, optim.lr, schedule.warmup_lr, schedule.min_lr)
    scale = optim.lr_base_scale or ("sqrt" if any(o in optim.opt.lower() for o in ("ada", "lamb")) else "linear")
    ratio = global_batch / optim.lr_base_size
    factor = ratio ** 0.5 if scale == "sqrt" else ratio
    if schedule.scale_warmup_min_lr:
        return LearningRates(global_batch, optim.lr_base * factor, schedule.warmup_lr * factor,
                             schedule.min_lr * factor)
    return LearningRates(global_batch, optim.lr_base * factor, schedule.warmup_lr, schedule.min_lr)


def anchor_lr_scale(optim: OptimOptions) -> float:
    return optim.anchor_lr_scale if optim.anchor_lr_scale is not None else 1.0


def check_optimizer_name(name: str) -> None:
    """Refuse, before any work, an --opt timm does not know (its optional ``lookahead_`` prefix allowed)."""
    known = set(list_optimizers())
    base = name.lower().removeprefix("lookahead_")
    if base not in known:
        close = difflib.get_close_matches(base, sorted(known), n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "see timm.optim.list_optimizers()"
        raise OptimError(f"--opt {name!r} is not an optimizer timm knows; {hint}")


#: timm optimizer names that are torch's own Adam/AdamW: they run fused on CUDA and on the CPU
FUSED_OPTIMIZERS = {"adam", "adamw"}
FUSED_DEVICES = ({"cuda"}, {"cpu"})


def create_optimizer(optim: OptimOptions, net: nn.Module, lr: float) -> torch.optim.Optimizer:
    """timm's create_optimizer_v2 over `param_groups`; Adam and AdamW of a network on CUDA or on the CPU fused."""
    kwargs: dict = {}
    if optim.opt_eps is not None:
        kwargs["eps"] = optim.opt_eps
    if optim.opt_betas is not None:
        kwargs["betas"] = tuple(optim.opt_betas)
    if optim.opt.lower() in FUSED_OPTIMIZERS and {p.device.type for p in net.parameters()} in FUSED_DEVICES:
        # CUDA: one kernel launch per step for all tensors, and a GradScaler that steps without reading found_inf
        # back. CPU: one vectorised pass per tensor, its square root the exact instruction; the unfused step's
        # Tensor.sqrt is MKL's vector math, whose last bits depend on the CPU model even on MKL_CBWR's compatible
        # branch, so the same run would train to other weights on another CPU
        kwargs["fused"] = True
    try:
        groups = param_groups(net, optim.weight_decay, anchor_lr_scale(optim), decay_all=optim.snnet_compat,
                              layer_decay=optim.layer_decay,
                              decay_stitch_biases=decays_stitch_biases(optim, getattr(net, "stitch_config", None)))
        return create_optimizer_v2(groups, opt=optim.opt, lr=lr,
                                   weight_decay=optim.weight_decay, momentum=optim.momentum, **kwargs)
    except ValueError as e:
        raise OptimError(f"--opt {optim.opt!r}: {e}; see timm.optim.list_optimizers()") from None


def decays_stitch_biases(optim: OptimOptions, stitch_cfg) -> bool:
    """--snnet-compat on a config whose SN-Net decayed its stitching layers' biases (``snnet_stitch_bias_decay``:
    the Swin card)."""
    return bool(optim.snnet_compat and stitch_cfg is not None and stitch_cfg.get("snnet_stitch_bias_decay"))


def fit_warmup(warmup_epochs: int, epochs: int, typed: bool, source: str = "timm's default"
               ) -> tuple[int, str | None]:
    """The warm-up a run of `epochs` epochs gets, and the one line saying so when it is not `warmup_epochs`.

    A warm-up at least as long as the run means the run never trains at its LR (timm's default 5 epochs on a
    3-epoch run trained at 1e-5, 1e-2, 2e-2 while the log said 5e-2). Typed on the command line (`typed`) that is a
    contradiction, refused (UsageError); from a default, YAML or recipe card it is clipped to none, so the run starts
    at its LR and decays from there as the schedule says: a shorter warm-up would be a length nobody chose. `source`:
    where the untyped value came from ("timm's default", or the file that set it), named in the line."""
    if warmup_epochs <= 0 or warmup_epochs < epochs:
        return warmup_epochs, None
    if typed:
        raise UsageError(f"--warmup-epochs {warmup_epochs} is not shorter than --epochs {epochs}: the run would end "
                         f"before its LR is reached; give --warmup-epochs below {epochs} (0 for none)")
    said = source if source == "timm's default" else f"from the {source}" if source.startswith("stitch") else \
        f"from {source}"
    return 0, (f"warm-up: {warmup_epochs} epochs ({said}) is "
               f"not shorter than the run's {epochs} epochs, so this run has none and starts at its LR; "
               f"--warmup-epochs N below {epochs} sets one")


def epoch_offset(schedule: ScheduleOptions) -> int:
    """1 when per-epoch schedules step one epoch late (--lr-one-epoch-late), else 0."""
    return int(schedule.lr_one_epoch_late and not schedule.sched_on_updates)


def describe_schedule(schedule: ScheduleOptions, eval_metric: str, warmup_lr: float, min_lr: float) -> dict[str, Any]:
    """The LR schedule timm builds from the options, built on a one-parameter optimizer (so one timm refuses is
    refused here): its total number of epochs and how it steps (args.yaml's resolved schedule, and train.py's check)."""
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    _, total = create_scheduler(schedule, probe, 1, warmup_lr, min_lr, eval_metric=eval_metric)
    return {"sched": schedule.sched, "total_epochs": int(total), "warmup_epochs": schedule.warmup_epochs,
            "warmup_prefix": schedule.warmup_prefix, "cooldown_epochs": schedule.cooldown_epochs,
            "warmup_lr": warmup_lr, "min_lr": min_lr,
            "steps": "per update" if schedule.sched_on_updates else "per epoch",
            "epoch_offset": epoch_offset(schedule)}


def create_scheduler(schedule: ScheduleOptions, optimizer: torch.optim.Optimizer, updates_per_epoch: int,
                     warmup_lr: float, min_lr: float, start_epoch: int = 0, global_step: int | None = None,
                     eval_metric: str = "top1"):
    """timm's create_scheduler_v2 with the run's resolved warm-up and minimum LR, fast-forwarded to `start_epoch`
    (per-epoch schedules) or `global_step` (``--sched-on-updates``; default start_epoch x updates_per_epoch). A
    plateau schedule watches `eval_metric` (decreasing when it is a loss, as timm's scheduler_kwargs reads it).
    Returns (scheduler, number of epochs)."""
    # timm reads the flags by attribute (getattr with its defaults): the typed options have those names
    kwargs = {**scheduler_kwargs(schedule, decreasing_metric="loss" in eval_metric), "warmup_lr": warmup_lr,
              "min_lr": min_lr}
    try:
        scheduler, num_epochs = create_scheduler_v2(optimizer, **kwargs, updates_per_epoch=updates_per_epoch)
    except ValueError as e:
        raise OptimError(f"--sched {schedule.sched!r}: {e}; use cosine, tanh, step, multistep, plateau or poly") \
            from None
    updates = start_epoch * updates_per_epoch if global_step is None else global_step
    if schedule.sched_on_updates and updates > 0:
        scheduler.step_update(updates)
    elif not schedule.sched_on_updates and start_epoch - epoch_offset(schedule) > 0:
        scheduler.step(start_epoch - epoch_offset(schedule))
    return scheduler, num_epochs
