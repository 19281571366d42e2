"""Transforms and data configs: the training crop modes, timm's evaluation transform (one config or several of one
image), each anchor's own data config and their grouping."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import timm
import torch
from timm.data import create_transform, resolve_data_config
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms as T


def pretrained_cfg(name: str | None) -> dict[str, Any]:
    """timm's pretrained config of a model name as a dict ({} for None, or a name or tag timm does not know: the
    checks at build time name it)."""
    if name is None:
        return {}
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:
        cfg = None
    return cfg.to_dict() if cfg is not None else {}


def eval_data_config(flags: Mapping[str, Any], stitch_cfg=None) -> dict[str, Any]:
    """timm's data config of a run (its largest anchor's defaults, or --model's, under train.py's flags: `flags` is
    the mapping of flag names to values) and the eval resize it means (args.yaml's eval_transform; the transform
    itself is `eval_transform`)."""
    name = stitch_cfg.anchors[-1].name if stitch_cfg is not None else flags.get("model")
    cfg = resolve_data_config(dict(flags), pretrained_cfg=pretrained_cfg(name))
    size = cfg["input_size"][-1]
    return {"input_size": list(cfg["input_size"]), "resize": math.floor(size / cfg["crop_pct"]),
            "crop_pct": cfg["crop_pct"], "crop_mode": cfg.get("crop_mode", "center"),
            "interpolation": cfg["interpolation"], "mean": list(cfg["mean"]), "std": list(cfg["std"])}


def timm_crop_mode(mode: str) -> str:
    """--train-crop-mode as timm's transform factory takes it ('src' is built on timm's 'rrc': see src_crop)."""
    return "rrc" if mode == "src" else mode


def src_crop(transform, size: int):
    """DeiT-III's 3-Augment crop (SN-Netv2's training, docs/snnet_compat.md C36) in place of timm's random-resized
    crop: resize the short side to `size` with the crop's interpolation, then a random `size` crop of the image
    padded by 4 px (reflect). Returns the transform with every RandomResizedCropAndInterpolation replaced."""
    replaced = 0

    def swap(t):
        nonlocal replaced
        if isinstance(t, RandomResizedCropAndInterpolation):
            replaced += 1
            interp = t.interpolation if not isinstance(t.interpolation, (list, tuple)) else T.InterpolationMode.BICUBIC
            return T.Compose([T.Resize(size, interpolation=interp),
                              T.RandomCrop(size, padding=4, padding_mode="reflect")])
        if isinstance(t, T.Compose):
            t.transforms = [swap(c) for c in t.transforms]
        return t

    transform = swap(transform)
    if not replaced:
        raise ValueError(f"--train-crop-mode src: no random-resized crop found in the training transform {transform!r}")
    return transform


def eval_transform(data_cfg: Mapping[str, Any] | Sequence[Mapping[str, Any]]):
    """timm's evaluation transform (resize, crop, normalise) of one data config, as timm's resolve_data_config gives
    it or as JSON stores it (lists: an export's model.json, a pretrained_cfg_overlay); of several (a sequence):
    `PerConfig`, a tuple of tensors per image, one per config. The one evaluation transform: training, the tools,
    the Python API and `snnet serve` all build theirs here."""
    if not isinstance(data_cfg, Mapping):
        return PerConfig([eval_transform(c) for c in data_cfg])
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in data_cfg.items()}
    return create_transform(cfg["input_size"], is_training=False, interpolation=cfg["interpolation"],
                            mean=cfg["mean"], std=cfg["std"], crop_pct=cfg["crop_pct"],
                            crop_mode=cfg.get("crop_mode", "center"))


class PerConfig:
    """Several transforms of one decoded image: a tuple of tensors, one per data config. A loader's default collate
    turns a batch of them into a list of batched tensors, in the same order (the same images in every one)."""
    def __init__(self, transforms: Sequence[Any]):
        self.transforms = tuple(transforms)

    def __call__(self, img) -> tuple:
        return tuple(t(img) for t in self.transforms)

    def __repr__(self) -> str:
        return f"PerConfig({', '.join(repr(t) for t in self.transforms)})"


def _config_key(cfg: dict[str, Any]) -> tuple:
    """A hashable form of a data config: (3, 16, 16) and [3, 16, 16] (a JSON pretrained_cfg_overlay) are equal."""
    def norm(v: Any) -> Any:
        return tuple(norm(e) for e in v) if isinstance(v, (list, tuple)) else v
    return tuple(sorted((k, norm(v)) for k, v in cfg.items()))


def group_data_configs(configs: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[int]]:
    """(distinct, group): the distinct data configs in order of first use, and per entry of `configs` the index of
    its config in `distinct`. Anchors with equal configs share one group, i.e. one decoded and transformed tensor."""
    distinct: list[dict[str, Any]] = []
    keys: dict[tuple, int] = {}
    group = []
    for cfg in configs:
        key = _config_key(cfg)
        if key not in keys:
            keys[key] = len(distinct)
            distinct.append(dict(cfg))
        group.append(keys[key])
    return distinct, group


def anchor_data_configs(models: Sequence[torch.nn.Module], args: dict[str, Any] | None = None
                        ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[int]]:
    """Each anchor's own evaluation preprocessing: timm's resolve_data_config on that anchor (its pretrained_cfg:
    mean, std, interpolation, crop_pct, input size), with `args` (e.g. ``{"img_size": 16}``) over it.

    Returns (per_anchor, distinct, group): per_anchor[a] is anchor a's config, distinct[group[a]] the same config
    shared by every anchor equal to it (see `group_data_configs`). Pass `distinct` to `clean_images` or
    `create_eval_loader` and `group` to the network (``ComposedNet(..., input_groups=group)``). An SN-Net is trained
    and evaluated with one config (the largest anchor's, train.py); this is for tools that run anchors side by
    side (`snnet similarity`, `snnet search`), where feeding one anchor another's preprocessing changes its numbers."""
    per_anchor = [resolve_data_config(dict(args or {}), model=m) for m in models]
    distinct, group = group_data_configs(per_anchor)
    return per_anchor, distinct, group
