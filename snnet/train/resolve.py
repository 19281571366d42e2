"""The whole run, resolved before it starts: what `train.py --dry-run` prints and every run writes as args.yaml.

Everything here comes from the arguments (all configuration layers already applied), the launch's world size and
timm's pretrained configs: no weights are loaded and no image is read, so a recipe can be checked on any machine.
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Any

from snnet.core.config import StitchConfig
from snnet.train.optim import anchor_lr_scale, epoch_offset, resolve_lrs


def launch_world_size() -> int:
    """The number of processes torchrun started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _pretrained_cfg(name: str) -> dict[str, Any]:
    import timm
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # an unknown tag: the checks at build time name it
        cfg = None
    return cfg.to_dict() if cfg is not None else {}


def eval_transform(args: argparse.Namespace, stitch_cfg: StitchConfig | None) -> dict[str, Any]:
    """timm's data config of the run (the largest anchor's defaults under the flags), and the eval resize it means."""
    from timm.data import resolve_data_config
    name = stitch_cfg.anchors[-1].name if stitch_cfg is not None else args.model
    cfg = resolve_data_config(vars(args), pretrained_cfg=_pretrained_cfg(name))
    size = cfg["input_size"][-1]
    return {"input_size": list(cfg["input_size"]), "resize": math.floor(size / cfg["crop_pct"]),
            "crop_pct": cfg["crop_pct"], "crop_mode": cfg.get("crop_mode", "center"),
            "interpolation": cfg["interpolation"], "mean": list(cfg["mean"]), "std": list(cfg["std"])}


def schedule(args: argparse.Namespace, warmup_lr: float, min_lr: float) -> dict[str, Any]:
    """The LR schedule timm builds from the flags: its total number of epochs and how it steps."""
    import torch

    from snnet.train.optim import create_scheduler
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    _, total = create_scheduler(args, probe, 1, warmup_lr, min_lr)
    return {"sched": args.sched, "total_epochs": int(total), "warmup_epochs": args.warmup_epochs,
            "warmup_prefix": args.warmup_prefix, "cooldown_epochs": args.cooldown_epochs,
            "warmup_lr": warmup_lr, "min_lr": min_lr,
            "steps": "per update" if args.sched_on_updates else "per epoch",
            "epoch_offset": epoch_offset(args)}


def describe_run(args: argparse.Namespace, stitch_cfg: StitchConfig | None, world_size: int,
                 device_type: str) -> dict[str, Any]:
    """The resolved run: timm's args.yaml entries plus a ``resolved`` section of what they amount to."""
    global_batch = args.batch_size * world_size * max(1, getattr(args, "grad_accum_steps", 1) or 1)
    lr, warmup_lr, min_lr = resolve_lrs(args, global_batch)
    scale = anchor_lr_scale(args)
    amp = None
    if args.amp:
        amp = {"dtype": args.amp_dtype or ("float16" if device_type == "cuda" else "bfloat16"),
               "covers": "forward" if args.no_amp_loss else "forward and loss (teacher included)"}
    resolved = {
        "world_size": world_size, "global_batch": global_batch, "device": device_type, "lr": lr,
        "param_groups": {"anchors": {"lr": lr * scale, "lr_scale": scale, "weight_decay": args.weight_decay},
                         "stitching_layers": {"lr": lr, "lr_scale": 1.0, "weight_decay": args.weight_decay},
                         "no_weight_decay": "1-D params, biases" + ("" if args.snnet_compat else
                                                                    ", the anchors' no_weight_decay names")},
        "schedule": schedule(args, warmup_lr, min_lr),
        "eval_transform": eval_transform(args, stitch_cfg),
        "teacher": None if args.distillation_type == "none" else {
            "name": args.teacher, "type": args.distillation_type, "alpha": args.distillation_alpha,
            "tau": args.distillation_tau},
        "amp": amp,
        "anchors": [a.name for a in stitch_cfg.anchors] if stitch_cfg is not None else [args.model],
        "ls_mode": (args.ls_mode or stitch_cfg.get("ls_mode")) if stitch_cfg is not None else None,
    }
    plain = {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(vars(args).items())}
    return {**plain, "resolved": resolved}


def to_yaml(run: dict[str, Any]) -> str:
    import yaml
    return yaml.safe_dump(run, sort_keys=False, default_flow_style=None, width=120)
