"""The whole run, resolved before it starts: what `train.py --dry-run` prints and every run writes as args.yaml.

Everything here comes from the arguments (all configuration layers already applied), the launch's world size and
timm's pretrained configs: no weights are loaded and no image is read, so a recipe can be checked on any machine.

The ``network`` section is the SN-Net itself: `describe_run` builds it with the run's own function
(`snnet.train.network.build_network`, structure only: its parameters on torch's meta device, shapes only, seconds,
no memory), or takes the built network of a real run. A FLOPs-bucket sampler (``ros``) needs
each route's FLOPs: only then is the meta network given real, zero-filled storage on the CPU and priced by the cost
model (FLOPs depend on shapes, not weights; about 15 s for DeiT-III S/L on two CPU cores).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import Any

import yaml
from timm.data import resolve_data_config
from timm.layers import DropPath

from snnet.data.transforms import eval_data_config, pretrained_cfg
from snnet.stitching.config import ConfigError, StitchConfig
from snnet.train.network import build_network
from snnet.train.optim import anchor_lr_scale, decays_stitch_biases, describe_schedule
from snnet.train.options import RunOptions
from snnet.train.sampler import anchor_routes, run_sampler, train_ids


def recorded_arguments(options: RunOptions, **resolved: Any) -> Mapping[str, Any]:
    """train.py's arguments as args.yaml, a checkpoint's "args" and the loggers record them: the run's options by
    flag name (lists as typed), then what the run `resolved` (rank, world size, classes). Read-only; the run itself
    reads its typed options, never this record."""
    return MappingProxyType({**{k: list(v) if isinstance(v, tuple) else v for k, v in options.values().items()},
                             **resolved})


def describe_run(options: RunOptions, stitch_cfg: StitchConfig | None, device_type: str, net=None,
                 recorded: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The resolved run (`options`, as `snnet.train.resolve.resolve` returned them): timm's args.yaml entries
    (`recorded`, else the options' `recorded_arguments`) plus a ``resolved`` section of what they amount to, the
    network included (`net`: the run's built network; None: built here on the meta device), on a `device_type`
    (cuda, cpu) device. Returns the mapping args.yaml holds."""
    optim, train, loss = options.optim, options.train, options.loss
    global_batch, lr = options.global_batch, options.lr
    scale = anchor_lr_scale(optim)
    stitch_bias_decay = decays_stitch_biases(optim, stitch_cfg)
    amp = None
    if train.amp:
        amp = {"dtype": train.amp_dtype or ("float16" if device_type == "cuda" else "bfloat16"),
               "covers": "forward" if train.no_amp_loss else "forward and loss (teacher included)"}
    section = {
        "world_size": options.world_size, "global_batch": global_batch, "device": device_type, "lr": lr,
        "param_groups": {"anchors": {"lr": lr * scale, "lr_scale": scale, "weight_decay": optim.weight_decay},
                         "stitching_layers": {"lr": lr, "lr_scale": 1.0, "weight_decay": optim.weight_decay,
                                              "bias_weight_decay": optim.weight_decay if stitch_bias_decay else 0.0},
                         "no_weight_decay": ("the anchors' 1-D params and biases" if stitch_bias_decay else
                                             "1-D params, biases") + ("" if optim.snnet_compat else
                                                                      ", the anchors' no_weight_decay names")},
        "schedule": describe_schedule(options.schedule, options.eval.eval_metric, options.warmup_lr,
                                      options.min_lr),
        "eval_transform": eval_data_config(recorded_arguments(options), stitch_cfg),
        "teacher": None if loss.distillation_type == "none" else {
            "name": loss.teacher, "type": loss.distillation_type, "alpha": loss.distillation_alpha,
            "tau": loss.distillation_tau},
        "amp": amp,
        "anchors": [a.name for a in stitch_cfg.anchors] if stitch_cfg is not None else [options.network.model],
        "ls_mode": (options.job.ls_mode or stitch_cfg.get("ls_mode")) if stitch_cfg is not None else None,
        "network": describe_network(options, stitch_cfg, net, amp["dtype"] if amp else None),
    }
    plain = {k: (list(v) if isinstance(v, tuple) else v)
             for k, v in sorted((recorded if recorded is not None else recorded_arguments(options)).items())}
    return {**plain, "resolved": section}


# ------------------------------------------------------------------------------------------------------ the network
PLAN_KINDS = {"two_way": "two_way (SN-Netv2: both directions and two-hop routes, one layer per position)",
              "sliding_window": "sliding_window (SN-Net: neighbouring anchors, sliding windows of blocks)",
              "stagewise": "stagewise (SN-Net's hierarchical families: stage by stage, neighbouring anchors)",
              "positions": "explicit positions (the config's 'positions')"}


def _plan_kind(stitch_cfg: StitchConfig, net) -> str:
    if getattr(net, "plan", None) is not None and net.plan.hierarchical:
        return PLAN_KINDS["stagewise"]
    if stitch_cfg.get("positions"):
        return PLAN_KINDS["positions"]
    return PLAN_KINDS.get(stitch_cfg.get("stitch_plan"), stitch_cfg.get("stitch_plan"))


def _drop_path(anchor) -> dict[str, Any]:
    """The drop-path rate of each block of an anchor (timm's DropPath modules; 0 where a block has none)."""
    rates = []
    for _name, m in anchor.named_modules():
        if not any(n.startswith("drop_path") for n, _ in m.named_children()):
            continue
        probs = [c.drop_prob if isinstance(c, DropPath) else 0.0 for n, c in m.named_children()
                 if n.startswith("drop_path")]
        rates.append(round(max(probs), 6))
    return {"per_block": rates, "max": max(rates, default=0.0)}


def _anchor_entry(spec, anchor, schedule: str, random: bool = False) -> dict[str, Any]:
    """One anchor of the dry run; `random`: --no-pretrained (an anchor without a checkpoint starts from random
    weights, not timm's pretrained ones, whatever the plain --model flag --pretrained says)."""
    cfg = pretrained_cfg(spec.name)
    data = resolve_data_config({}, pretrained_cfg=cfg) if cfg else {}
    hub = f"timm pretrained, tag {cfg.get('tag') or '(default)'}" if cfg else "timm, no pretrained config"
    return {"name": spec.name, "weights": spec.checkpoint or ("random (--no-pretrained)" if random else hub),
            "params": sum(p.numel() for p in anchor.parameters()),
            "drop_path": {"schedule": schedule, **_drop_path(anchor)},
            "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}}


def _stitching_layers(net) -> dict[str, Any]:
    layers = [net.stitch_layer(spec.address) for spec in net.plan.layers]
    if not layers:
        return {"count": 0}
    first = layers[0]
    params = [(n.rsplit(".", 1)[-1], p) for layer in layers for n, p in layer.named_parameters()]
    entry = {"type": getattr(first, "layer_type", type(first).__name__), "count": len(layers),
             "params": sum(p.numel() for _, p in params),
             "trainable_params": sum(p.numel() for _, p in params if p.requires_grad),
             "trainable": sorted({n for n, p in params if p.requires_grad}),
             "frozen": sorted({n for n, p in params if not p.requires_grad})}
    if hasattr(first, "rank"):
        entry["rank"] = first.rank
    if hasattr(first, "alpha"):
        entry["alpha"] = first.alpha
        entry["scale"] = first.alpha / first.rank
    return entry


def _ls_init(options: RunOptions, stitch_cfg: StitchConfig, amp_dtype: str | None) -> dict[str, Any]:
    job = options.job
    if not stitch_cfg.get("ls_init") or job.no_ls_init:
        return {"on": False}
    mode = job.ls_mode or stitch_cfg.get("ls_mode")
    entry = {"on": True, "mode": mode, "images": job.stitch_init_bs or stitch_cfg.get("stitch_init_bs"),
             "when": "only without --resume / --initial-checkpoint"}
    if mode == "snnet" and stitch_cfg.get("stitch_plan") == "two_way":
        entry["fit"] = (f"SN-Netv2's: the first training batch per process (training augmentation, mixup/cutmix), "
                        f"eval mode, autocast {amp_dtype or 'off'}, float32 pinv per position with torch's default "
                        f"cut-off, rank 0's layers kept")
    elif mode == "snnet":
        entry["fit"] = ("SN-Net's: the first training batch per process (training augmentation, mixup/cutmix), train "
                        "mode, float32 pinv per position (cut-off 1e-15 relative), solutions averaged per layer, "
                        "rank 0's layers kept")
    else:
        entry["fit"] = (f"{mode}: clean images (validation transform), eval mode, float64 normal equations summed "
                        f"over processes, solved on rank 0")
    return entry


def describe_network(options: RunOptions, stitch_cfg: StitchConfig | None, net=None,
                     amp_dtype: str | None = None) -> dict[str, Any]:
    """The network a run trains: plan, networks in total and drawn in training, the sampler with its buckets, the
    stitching layers, each anchor's weights, drop-path and data config, and the LS init."""
    if stitch_cfg is None:
        return {"plan": "plain (one timm model, one network)", "networks": 1, "trained": 1,
                "model": options.network.model}
    if net is None and "select" in (stitch_cfg.get("positions") or {}):
        return {"plan": _plan_kind(stitch_cfg, None), "positions": "chosen from data at run time (written to "
                "<output>/stitch_plan.json); the network is described in the run's own args.yaml",
                "ls_init": _ls_init(options, stitch_cfg, amp_dtype)}
    if net is None:  # the run's network as train.py builds it, on the meta device (no weight read or allocated)
        network = options.network
        network = replace(network, num_classes=network.num_classes or stitch_cfg.get("num_classes"))
        net, _ = build_network(network, stitch_cfg, structure_only=True)
    excluded = sorted(stitch_cfg.get("train_exclude") or [])
    freeze = options.train.freeze_anchors
    frozen_anchors = anchor_routes(net) if freeze else []
    try:
        ids = train_ids(net.num_configs, excluded) or list(range(net.num_configs))
    except ValueError as e:
        raise ConfigError(f"stitch config {stitch_cfg.path!r}: {e}") from None
    trained = [c for c in ids if c not in frozen_anchors]
    spec = stitch_cfg.get("sampler")
    sampler = run_sampler(net, stitch_cfg, options.train.seed, 0, sync=options.train.sample_sync,
                          freeze_anchors=freeze)
    try:
        sampler_entry = sampler.describe() if hasattr(sampler, "describe") else {"type": (spec or {}).get("type")}
    except (ValueError, TypeError) as e:
        raise ConfigError(f"stitch config field 'sampler' {spec!r}: {e}") from None
    if "buckets" in sampler_entry:
        sampler_entry["flops"] = "cost model (fvcore convention), one image at the network's input size"
    by_stitches: dict[int, int] = {}
    for route in net.plan.routes:
        by_stitches[len(route.stitches)] = by_stitches.get(len(route.stitches), 0) + 1
    anchors = "frozen (--freeze-anchors)" if freeze else \
        "trained" if stitch_cfg.get("fulltune") else "frozen except parameters named 'cls' (fulltune false)"
    return {
        "plan": _plan_kind(stitch_cfg, net), "networks": net.num_configs,
        "routes_by_stitches": {f"{k} stitch(es)" if k else "anchors": v for k, v in sorted(by_stitches.items())},
        "trained": len(trained), "train_exclude": excluded, "evaluated": net.num_configs,
        "sampler": sampler_entry,
        "stitching_layers": _stitching_layers(net),
        "final_norm_on_stitched_routes": not net.skip_final_norm if hasattr(net, "skip_final_norm") else None,
        "anchor_parameters": anchors,
        "anchors": [_anchor_entry(spec_, net.anchor(i), stitch_cfg.get("drop_path_schedule"),
                                  options.network.no_pretrained)
                    for i, spec_ in enumerate(stitch_cfg.anchors)],
        "ls_init": _ls_init(options, stitch_cfg, amp_dtype),
    }


def to_yaml(run: dict[str, Any]) -> str:
    return yaml.safe_dump(run, sort_keys=False, default_flow_style=None, width=120)
