"""The network a run trains or evaluates, built forward: anchors, then the stitch positions, then the SN-Net (or one
timm model). train.py builds it here, and the preflight builds the same network on the meta device first
(`structure_only`), so that what the architecture decides is refused before any weight or image is touched."""
from __future__ import annotations

import contextlib
from typing import Any

import torch

from snnet.stitching.build import create_anchor, create_anchors, input_size_for, snnet_from_anchors
from snnet.stitching.config import AnchorSpec, ConfigError, StitchConfig
from snnet.stitching.model import PlainNet, RoutedNet
from snnet.train.options import NetworkOptions
from snnet.train.positions import Selection, check_selectable
from snnet.train.sampler import train_ids


def build_network(options: NetworkOptions, stitch_cfg: StitchConfig | None, images_from=None,
                  structure_only: bool = False) -> tuple[RoutedNet | None, StitchConfig | None]:
    """The network, built forward: anchors, then the stitch positions (chosen from data when the config asks, on
    these anchors), then the SN-Net on them. Returns the network and the config it was built from (positions
    explicit), which the run records.

    `structure_only` (the preflight): the same build on the meta device, no weight read or downloaded, so what the
    architecture decides (model arguments, stitchable anchors, the resolutions, enough positions to select) is
    refused before any work; a config that selects its positions from data then returns no network."""
    kwargs: dict[str, Any] = dict(num_classes=options.num_classes, drop_path_rate=options.drop_path,
                                  drop_rate=options.drop)
    if options.img_size is not None:
        kwargs["img_size"] = options.img_size
    if options.in_chans is not None:
        kwargs["in_chans"] = options.in_chans
    if stitch_cfg is None:
        if options.model is None:
            raise ConfigError("no network to build: name a stitch config or a model (--stitch_config or --model)")
        spec = AnchorSpec(options.model, None, dict(options.model_kwargs))
        return PlainNet(create_anchor(spec, options.pretrained, structure_only, **kwargs), options.model), None
    cfg = stitch_cfg.with_model_kwargs(dict(options.model_kwargs))
    models, adapters = create_anchors(cfg, not options.no_pretrained, structure_only=structure_only, **kwargs)
    if "select" in (cfg.get("positions") or {}) and structure_only:
        check_selectable(cfg, models, adapters, input_size_for(cfg, models[-1], kwargs), options.in_chans or 3)
        return None, stitch_cfg
    if "select" in (cfg.get("positions") or {}):  # "positions" chosen on the training split, before the SN-Net
        if options.selection is None:
            raise ConfigError(f"stitch config {stitch_cfg.path!r} selects its positions from data; pass the "
                              f"training data (NetworkOptions.selection) or its stitch_plan.json")
        cfg = Selection(options.selection, images_from)(cfg, models, adapters)
        stitch_cfg = StitchConfig(list(stitch_cfg.anchors), {**stitch_cfg.values, "positions": cfg.get("positions")},
                                  stitch_cfg.path)
    with torch.device("meta") if structure_only else contextlib.nullcontext():
        return snnet_from_anchors(cfg, models, adapters, options.img_size, options.in_chans), stitch_cfg


def check_train_exclude(net: RoutedNet, stitch_cfg: StitchConfig | None) -> None:
    """The config's ``train_exclude`` names routes this network has, and leaves one to train (refused right after
    the build, before any work)."""
    try:
        train_ids(net.num_configs, (stitch_cfg.get("train_exclude") or []) if stitch_cfg is not None else [])
    except ValueError as e:
        raise ConfigError(f"stitch config {getattr(stitch_cfg, 'path', None)!r}: {e}") from None
