"""From a stitch config to an SN-Net: create the anchors with timm, check they can be stitched, plan the routes."""
from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from snnet.stitching.adapter import AnchorAdapter, AnchorError, adapter_for
from snnet.stitching.config import AnchorSpec, ConfigError, StitchConfig
from snnet.stitching.cut import probe, why_not_stitchable
from snnet.stitching.model import SNNet
from snnet.stitching.plan import StitchPlan, deit_plan, positions_plan, stagewise_plan, two_way_plan
from snnet.utils.checkpoint import CheckpointError, classifier_keys, load_weights


# timm is imported by the functions that use it: about 1 s, which `import snnet` and `snnet --help` do not pay
def check_model_name(name: str) -> None:
    import timm
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models()"
        raise AnchorError(f"unknown timm model name {name!r}: {hint}")
    if "." in name:  # a pretrained tag must exist even for random weights: it names the data config too
        arch, tag = name.split(".", 1)
        try:
            timm.models.get_pretrained_cfg(name)
        except RuntimeError:
            tags = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{arch}.*")]
            raise AnchorError(f"unknown pretrained tag {tag!r} of {arch!r}; its tags are: "
                              f"{', '.join(tags[:8]) or 'none'}") from None


def _create(spec: AnchorSpec, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    """timm.create_model; a model argument the model cannot take (``--model-kwargs mlp_ratio=abc``, a depth of -1,
    a width its heads do not divide: whatever timm raises, TypeError, AssertionError, RuntimeError, ...) is one line
    naming the model and the arguments, and so is a failed download of pretrained weights."""
    import timm
    try:
        return timm.create_model(spec.name, pretrained=pretrained, **kwargs)
    except TypeError as e:
        if "unexpected keyword argument 'img_size'" in str(e):
            raise  # create_anchor retries without it (CNNs take any size)
        raise _arguments_error(spec, kwargs, e) from None
    except Exception as e:
        if not pretrained:
            raise _arguments_error(spec, kwargs, e) from None
        if kwargs:  # do the arguments build the model without weights? If not, they are at fault, not the download
            try:
                timm.create_model(spec.name, pretrained=False, **kwargs)
            except Exception as built:
                raise _arguments_error(spec, kwargs, built) from None
        reason = " ".join(str(e).split())[:160] or type(e).__name__
        raise AnchorError(f"cannot load the pretrained weights of {spec.name!r} ({type(e).__name__}: {reason}); "
                          f"check the name and tag and the network, or give local weights (an anchor's "
                          f"\"checkpoint\", --teacher-checkpoint) or --no-pretrained") from None


def _arguments_error(spec: AnchorSpec, kwargs: dict[str, Any], e: BaseException) -> AnchorError:
    reason = " ".join(str(e).split())[:160]
    said = f"{type(e).__name__}: {reason}" if reason else type(e).__name__
    return AnchorError(f"cannot create {spec.name!r} with arguments {kwargs} ({said}); fix --model-kwargs or the "
                       f"anchor's model_kwargs")


def create_anchor(spec: AnchorSpec, pretrained: bool = True, structure_only: bool = False,
                  **model_kwargs: Any) -> nn.Module:
    """timm.create_model by name; weights from the spec's local checkpoint when it names one. `structure_only`: the
    architecture alone, on the meta device (no weight is read, downloaded or even allocated): what the preflight
    checks the network's structure on, in well under a second for any family."""
    check_model_name(spec.name)
    kwargs = {k: v for k, v in model_kwargs.items() if v is not None}
    kwargs.update(spec.model_kwargs)
    if structure_only:
        with torch.device("meta"):
            return create_anchor(AnchorSpec(spec.name, None, spec.model_kwargs), pretrained=False, **model_kwargs)
    pretrained = pretrained and spec.checkpoint is None
    try:
        model = _create(spec, pretrained, kwargs)
    except TypeError:
        if "img_size" not in kwargs or "img_size" in spec.model_kwargs:
            raise AnchorError(f"{spec.name!r} takes no img_size argument; remove it from its model_kwargs") from None
        # CNNs take any image size and have no img_size argument
        model = _create(spec, pretrained, {k: v for k, v in kwargs.items() if k != "img_size"})
    if spec.checkpoint is not None:
        anchor_weights(model, spec)
    return model


def anchor_weights(model: nn.Module, spec: AnchorSpec, check_only: bool = False, skip_head: bool = False) -> None:
    """The anchor's local checkpoint loaded into `model` (its architecture), or with `check_only` only checked to fit
    it (the preflight, on the meta-device anchor; `skip_head`: not the classifier, whose size the data decides)."""
    assert spec.checkpoint is not None
    skip = classifier_keys(model) if skip_head else set()
    try:
        load_weights(model, spec.checkpoint, f"checkpoint of anchor {spec.name!r}",
                     "check the anchor name, num_classes and img_size, or fix the path in the config", check_only, skip)
    except CheckpointError as e:
        raise AnchorError(str(e)) from None


def plan_for(models: Sequence[nn.Module], adapters: Sequence[AnchorAdapter], names: Sequence[str],
             kernel: int = 2, stride: int = 1, nearest: bool = True,
             stitch_stages: Sequence[int] | None = None, kind: str = "sliding_window",
             positions: dict | None = None) -> StitchPlan:
    """The plan SN-Net uses for these anchors: DeiT-style for plain ViTs, stage-wise for hierarchical families;
    ``kind="two_way"``: SN-Netv2's two-way plan for two plain ViTs, or for hierarchical anchors each stitched stage
    in both directions; ``"large_to_small"``: hierarchical anchors, the larger anchor in front only
    (plan.stagewise_plan); `positions` (the config's explicit
    ``{"pairs": ...}``): those positions of plain ViTs, one stitching layer each (plan.positions_plan)."""
    depths = [ad.stage_depths(m) for ad, m in zip(adapters, models)]
    hierarchical = [ad.hierarchical for ad in adapters]
    staged = [f"{n!r} ({ad.family}, hierarchical)" for n, ad, h in zip(names, adapters, hierarchical) if h]
    if positions is not None:
        if staged:
            raise AnchorError(f"'positions' takes plain ViT anchors; {', '.join(staged)} cannot join them "
                              f"(hierarchical families stitch by stage): remove 'positions' or that anchor")
        if "pairs" not in positions:
            raise AnchorError(f"'positions' here takes explicit 'pairs', got {sorted(positions)}; select through "
                              f"train.py, which writes the pairs it chose")
        _check_widths(models, adapters, names, [0])
        return positions_plan([d[0] for d in depths], positions["pairs"])
    # hierarchical anchors stitched the larger in front too (two_way) or only (large_to_small), one hop per route
    large_front = kind in ("two_way", "large_to_small") and bool(hierarchical) and all(hierarchical)
    if kind == "large_to_small" and not large_front:
        raise AnchorError(f"'stitch_plan': 'large_to_small' takes hierarchical anchors (stage by stage); "
                          f"{', '.join(map(repr, names))} are not all hierarchical: use two_way or sliding_window")
    if kind == "two_way" and not large_front:
        if len(models) != 2:
            raise AnchorError(f"two-way stitching (SN-Netv2) takes two plain ViT anchors, got {len(models)}: "
                              f"{list(names)}; keep two")
        if staged:
            raise AnchorError(f"two-way stitching (SN-Netv2) takes two plain ViT anchors; {', '.join(staged)} cannot "
                              f"join: use a plain ViT (e.g. a DeiT) or the stage-wise plan")
        _check_widths(models, adapters, names, [0])
        return two_way_plan(depths[0][0], depths[1][0])
    if not any(hierarchical):
        if stitch_stages is not None:
            raise AnchorError(f"'stitch_stages' {list(stitch_stages)} takes hierarchical anchors (stage by stage); "
                              f"{', '.join(map(repr, names))} are plain ViTs, stitched block by block: remove "
                              f"'stitch_stages' from the stitch config")
        d0 = depths[0][0]
        for name, d in zip(names, depths):
            if d[0] != d0:
                raise AnchorError(f"paired stitching needs anchors of equal depth: {names[0]!r} has {d0} blocks, "
                                  f"{name!r} has {d[0]}; use anchors of one depth")
        _check_widths(models, adapters, names, [0])
        return deit_plan(len(models), d0, kernel, stride, nearest)
    if not all(hierarchical):
        plain = [f"{n!r}" for n, h in zip(names, hierarchical) if not h]
        raise AnchorError(f"cannot mix plain ViT anchors with hierarchical ones: {', '.join(plain)} (plain) cannot "
                          f"join {', '.join(staged)}; stitch one kind")
    if stitch_stages is None:
        common = set(adapters[0].default_stitch_stages)
        for ad in adapters[1:]:
            common &= set(ad.default_stitch_stages)
        stitch_stages = sorted(common)
    plan = stagewise_plan(depths, list(stitch_stages), kernel=2, stride=1, names=names,
                          small_front=kind != "large_to_small", large_front=large_front)
    _check_widths(models, adapters, names, stitch_stages)
    return plan


def _check_widths(models, adapters, names, stages) -> None:
    for s in stages:
        widths = [ad.stage_width(m, s) for ad, m in zip(adapters, models)]
        for i in range(1, len(widths)):
            if widths[i] < widths[i - 1]:
                raise AnchorError(f"anchors are not ordered small to large: {names[i - 1]!r} is {widths[i - 1]} "
                                  f"wide but {names[i]!r} is {widths[i]} (stage {s}); list anchors smallest first")


@torch.no_grad()
def check_resolutions(model: SNNet, img_size: int | Sequence[int] = 224, in_chans: int = 3) -> None:
    """Refuse stitches whose two sides do not run at the same resolution for this input size.

    Family-agnostic: each anchor runs once on a zeros image, and for every stitch (j -> k) the front anchor's
    output of block j must have the spatial size (or token count) of the end anchor's input to block k, which is
    what the stitching layer maps and what the least-squares init pairs row by row.
    """
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)[-2:]
    positions = [st for spec in model.plan.layers for st in model.plan.positions_of_layer(spec.address)]
    if not positions:
        return
    _, where = model.feature_points(positions)  # the same feature points the LS init uses
    cuts = probe(model, size, in_chans)
    for st in positions:
        (fa, ux), (ea, uy) = where[(st.front, st.end, st.stage, st.j, st.k)]
        f, e = model.names[st.front], model.names[st.end]
        reason = why_not_stitchable(cuts[fa][ux], cuts[ea][uy], f"{f!r} block {st.j}", f"{e!r} block {st.k}",
                                    every_token=True)
        if reason is not None:
            raise AnchorError(
                f"cannot stitch {f!r} to {e!r} in stage {st.stage}: at {size[0]}x{size[1]} input, {reason}; stitch "
                f"anchors whose stage {st.stage} runs at the same resolution (same image size, patch size and "
                f"strides), or leave stage {st.stage} out of stitch_stages")


def input_size_for(cfg: StitchConfig, model: nn.Module, model_kwargs: dict) -> tuple[int, int]:
    size = model_kwargs.get("img_size") or cfg.get("input_size") or model.pretrained_cfg.get("input_size")
    size = size or 224
    return (size, size) if isinstance(size, int) else tuple(size)[-2:]


def set_constant_drop_path(model: nn.Module, rate: float) -> int:
    """SN-Netv2's stochastic depth: the same drop rate in every block, where timm ramps it linearly from 0
    (docs/snnet_compat.md, C36). Replaces each `drop_path*` child (timm's DropPath, or Identity where timm's rate was
    0); returns how many were set."""
    from timm.layers import DropPath  # timm: see check_model_name
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name.startswith("drop_path") and isinstance(child, (DropPath, nn.Identity)):
                setattr(module, name, DropPath(rate) if rate > 0 else nn.Identity())
                count += 1
    return count


def create_anchors(cfg: StitchConfig, pretrained: bool = True, num_classes: int | None = None,
                   drop_path_rate: float | None = None, structure_only: bool = False,
                   **model_kwargs: Any) -> tuple[list[nn.Module], list[AnchorAdapter]]:
    """A config's anchors from timm (pretrained, or the config's local checkpoints) and their adapters, in config
    order. Seed before calling: random anchors take the global RNG. `structure_only`: architectures on the meta
    device, no weights (`create_anchor`)."""
    for a in cfg.anchors:
        check_model_name(a.name)
    models = [create_anchor(a, pretrained, structure_only, num_classes=num_classes, drop_path_rate=drop_path_rate,
                            **model_kwargs) for a in cfg.anchors]
    if cfg.get("drop_path_schedule") == "constant":
        for a, m in zip(cfg.anchors, models):
            set_constant_drop_path(m, a.model_kwargs.get("drop_path_rate", drop_path_rate) or 0.0)
    return models, [adapter_for(m, a.name) for m, a in zip(models, cfg.anchors)]


def snnet_from_anchors(cfg: StitchConfig, models: Sequence[nn.Module], adapters: Sequence[AnchorAdapter],
                       img_size: int | Sequence[int] | None = None, in_chans: int | None = None) -> SNNet:
    """Built anchors wrapped into one SN-Net (not LS-initialised), its stitches checked at the input size. The
    positions must be known by now: a config whose ``"positions"`` selects from data is resolved first
    (snnet/train/positions.py `Selection`, which train.py runs on the built anchors before this)."""
    labels = cfg.labels()  # readable routes need distinct names: a label of the config's, or the timm name (#index)
    if "select" in (cfg.get("positions") or {}):
        raise ConfigError("stitch config: 'positions' selects from data, which only train.py does; pass the "
                          "stitch_plan.json it wrote (explicit 'pairs') instead")
    plan = plan_for(models, adapters, labels, cfg.get("stitch_kernel_size"), cfg.get("stitch_stride"),
                    cfg.get("nearest_stitching"), cfg.get("stitch_stages"), cfg.get("stitch_plan"),
                    cfg.get("positions"))
    skip = cfg.get("skip_final_norm")
    if skip is None:  # the family's SN-Net behaviour (on for plain ViTs: docs/snnet_compat.md, C7)
        skip = all(ad.skip_final_norm_default for ad in adapters)
    try:
        model = SNNet(models, plan, names=labels, adapters=adapters, skip_final_norm=skip,
                      stitch_layer=cfg.get("stitch_layer"), bn_stats=cfg.get("bn_stats"))
    except ValueError as e:  # an unknown stitching-layer type or option, or bn_stats value
        raise ConfigError(f"stitch config: {e}") from None
    model.stitch_config = cfg
    kwargs = {"img_size": img_size} if img_size is not None else {}
    size = input_size_for(cfg, model, kwargs)
    check_resolutions(model, size, in_chans or 3)
    if img_size is not None or cfg.get("input_size") is not None:  # CNN anchors keep no size of their own
        model.built_img_size = size
    return model


def build_snnet(cfg: StitchConfig, pretrained: bool = True, num_classes: int | None = None,
                drop_path_rate: float | None = None, **model_kwargs: Any) -> SNNet:
    """Anchors from timm (pretrained, or the config's local checkpoints), wrapped into one SN-Net (not LS-initialised):
    `create_anchors` then `snnet_from_anchors`. The config the network was built from is kept as
    ``model.stitch_config``. The image size and classes are the config's ``input_size`` and ``num_classes`` unless
    given (as they set train.py's ``--img-size`` and ``--num-classes`` defaults)."""
    if model_kwargs.get("img_size") is None and cfg.get("input_size") is not None:
        model_kwargs["img_size"] = cfg.get("input_size")
    num_classes = cfg.get("num_classes") if num_classes is None else num_classes
    models, adapters = create_anchors(cfg, pretrained, num_classes, drop_path_rate, **model_kwargs)
    return snnet_from_anchors(cfg, models, adapters, model_kwargs.get("img_size"), model_kwargs.get("in_chans"))
