"""Optimizer and LR schedule of a run: parameter groups, the LR rule, timm's optimizer and scheduler factories."""
from __future__ import annotations

import argparse

import torch
from torch import nn


class OptimError(ValueError):
    """An optimizer or schedule that cannot be built; the message names the flag and the fix."""


def param_groups(net: nn.Module, weight_decay: float, anchor_lr_scale: float) -> list[dict]:
    """Anchors vs. stitching layers (LR scale), each split into decay / no-decay (1-D params, biases, the anchors'
    own no_weight_decay names, which SN-Net dropped: docs/snnet_compat.md, C18)."""
    skip = net.no_weight_decay() if hasattr(net, "no_weight_decay") else set()
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        is_anchor = not name.startswith("stitch_layers.")
        no_decay = p.ndim <= 1 or name.endswith(".bias") or name in skip
        groups.setdefault((is_anchor, no_decay), []).append(p)
    out = []
    for (is_anchor, no_decay), params in sorted(groups.items()):
        out.append({"params": params, "weight_decay": 0.0 if no_decay else weight_decay,
                    "lr_scale": anchor_lr_scale if is_anchor else 1.0})
    return out


def resolve_lr(args: argparse.Namespace, global_batch: int) -> float:
    """--lr when given (absolute, as timm), else --lr-base scaled from --lr-base-size to the global batch
    (linearly, or by the square root for adaptive optimizers unless --lr-base-scale says)."""
    if args.lr is not None:
        return args.lr
    scale = args.lr_base_scale or ("sqrt" if any(o in args.opt.lower() for o in ("ada", "lamb")) else "linear")
    ratio = global_batch / args.lr_base_size
    return args.lr_base * (ratio ** 0.5 if scale == "sqrt" else ratio)


def anchor_lr_scale(args: argparse.Namespace) -> float:
    return args.anchor_lr_scale if args.anchor_lr_scale is not None else 1.0


def create_optimizer(args: argparse.Namespace, net: nn.Module, lr: float) -> torch.optim.Optimizer:
    """timm's create_optimizer_v2 over `param_groups`."""
    from timm.optim import create_optimizer_v2
    kwargs = {}
    if args.opt_eps is not None:
        kwargs["eps"] = args.opt_eps
    if args.opt_betas is not None:
        kwargs["betas"] = tuple(args.opt_betas)
    try:
        return create_optimizer_v2(param_groups(net, args.weight_decay, anchor_lr_scale(args)), opt=args.opt, lr=lr,
                                   weight_decay=args.weight_decay, momentum=args.momentum, **kwargs)
    except ValueError as e:
        raise OptimError(f"--opt {args.opt!r}: {e}; see timm.optim.list_optimizers()") from None


def create_scheduler(args: argparse.Namespace, optimizer: torch.optim.Optimizer, updates_per_epoch: int,
                     start_epoch: int = 0, global_step: int | None = None):
    """timm's create_scheduler_v2, fast-forwarded to `start_epoch` (per-epoch schedules) or `global_step`
    (``--sched-on-updates``; default start_epoch x updates_per_epoch). Returns (scheduler, number of epochs)."""
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs
    try:
        scheduler, num_epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args),
                                                    updates_per_epoch=updates_per_epoch)
    except ValueError as e:
        raise OptimError(f"--sched {args.sched!r}: {e}; use cosine, tanh, step, multistep, plateau or poly") from None
    updates = start_epoch * updates_per_epoch if global_step is None else global_step
    if args.sched_on_updates and updates > 0:
        scheduler.step_update(updates)
    elif not args.sched_on_updates and start_epoch > 0:
        scheduler.step(start_epoch)
    return scheduler, num_epochs
