"""The network a run trains or evaluates, built forward: anchors, then the stitch positions, then the SN-Net (or one
timm model). train.py builds it here, and the preflight builds the same network on the meta device first
(`structure_only`), so that what the architecture decides is refused before any weight or image is touched."""
from __future__ import annotations

import argparse
import contextlib

import torch

from snnet.core.config import ConfigError, StitchConfig
from snnet.core.model import PlainNet, RoutedNet
from snnet.train.positions import Selection, check_selectable


def build_network(args: argparse.Namespace, stitch_cfg: StitchConfig | None, num_classes: int,
                  images_from=None, structure_only: bool = False) -> tuple[RoutedNet | None, StitchConfig | None]:
    """The network, built forward: anchors, then the stitch positions (chosen from data when the config asks, on
    these anchors), then the SN-Net on them. Returns the network and the config it was built from (positions
    explicit), which the run records.

    `structure_only` (the preflight): the same build on the meta device, no weight read or downloaded, so what the
    architecture decides (model arguments, stitchable anchors, the resolutions, enough positions to select) is
    refused before any work; a config that selects its positions from data then returns no network."""
    kwargs = dict(num_classes=num_classes, drop_path_rate=args.drop_path, drop_rate=args.drop)
    if args.img_size is not None:
        kwargs["img_size"] = args.img_size
    if args.in_chans is not None:
        kwargs["in_chans"] = args.in_chans
    if stitch_cfg is None:
        from snnet.core.build import create_anchor
        from snnet.core.config import AnchorSpec
        spec = AnchorSpec(args.model, None, dict(args.model_kwargs))
        return PlainNet(create_anchor(spec, args.pretrained, structure_only, **kwargs), args.model), None
    from snnet.core.build import create_anchors, input_size_for, snnet_from_anchors
    cfg = stitch_cfg.with_model_kwargs(args.model_kwargs)
    models, adapters = create_anchors(cfg, not args.no_pretrained, structure_only=structure_only, **kwargs)
    if "select" in (cfg.get("positions") or {}) and structure_only:
        check_selectable(cfg, models, adapters, input_size_for(cfg, models[-1], kwargs), args.in_chans or 3)
        return None, stitch_cfg
    if "select" in (cfg.get("positions") or {}):  # "positions" chosen on the training split, before the SN-Net
        cfg = Selection(args, images_from)(cfg, models, adapters)
        stitch_cfg = StitchConfig(list(stitch_cfg.anchors), {**stitch_cfg.values, "positions": cfg.get("positions")},
                                  stitch_cfg.path)
    with torch.device("meta") if structure_only else contextlib.nullcontext():
        return snnet_from_anchors(cfg, models, adapters, args.img_size, args.in_chans), stitch_cfg


def check_train_exclude(net: RoutedNet, stitch_cfg: StitchConfig | None) -> None:
    """The config's ``train_exclude`` names routes this network has, and leaves one to train (refused right after
    the build, before any work)."""
    from snnet.train.sampler import train_ids
    try:
        train_ids(net.num_configs, (stitch_cfg.get("train_exclude") or []) if stitch_cfg is not None else [])
    except ValueError as e:
        raise ConfigError(f"stitch config {getattr(stitch_cfg, 'path', None)!r}: {e}") from None
