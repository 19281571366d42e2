"""Stitch positions chosen from data: the stitch config's ``"positions": {"select": SCORE, "per_pair": K}``.

SN-Net stitches neighbouring plain-ViT anchors at sliding-window positions (plan.deit_plan). With ``"positions"`` a
config lists its own positions instead, or asks for the K positions (j, k) of each neighbouring anchor pair that
score best in the compatibility map (snnet/explore/similarity.py's `compatibility_maps`):

* candidates: every (j, k) with j a block of the front anchor (0..depth-1) and k a block of the end anchor or its
  depth (0..depth; depth: the end anchor runs only its final norm and head). Position (j, k) is the map's edge
  (front unit of block j, end unit before block k): the stitch maps exactly the features the SN-Net's stitching
  layer maps and its least-squares init fits (`edge_units`);
* scores: ``cka`` (higher is better), ``ls`` (the least-squares residual, lower is better), ``kl`` (KL of the end
  anchor's output to the training-free stitched network's, lower is better); ties go to the smaller (j, k);
* images: the least-squares init's, i.e. `stitch_init_bs` clean training images (evaluation transform) drawn with
  ``--seed``, all of them in every process (the same draw the init's processes share between them), eval mode;
  under torchrun rank 0's choice is broadcast;
* the plan: one stitching layer per chosen position (plan.positions_plan), so the least-squares init fits each layer
  on its own position (``joint`` and ``average`` coincide; ``snnet`` fits on SN-Net's augmented batch instead).

The choice is plain data: train.py writes the config with ``"positions": {"pairs": [...], "from": {...}}`` to
``<output>/stitch_plan.json``, a stitch config that rebuilds the same network without images (``--eval --resume``,
``snnet export``).
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from timm.data import resolve_data_config
from torch import nn

from snnet.data.checks import DataError
from snnet.data.datasets import create_datasets
from snnet.data.ls_images import clean_images
from snnet.stitching.adapter import Unit, block_units, entry_unit
from snnet.stitching.config import ConfigError, StitchConfig
from snnet.stitching.cut import probe, why_not_stitchable
from snnet.stitching.maps import SimilarityError, anchors_net, compatibility_maps
from snnet.train.options import SelectionOptions
from snnet.utils.fileio import write_text_atomic

_logger = logging.getLogger("snnet")

PLAN_FILE = "stitch_plan.json"
#: config score name -> (compatibility map, +1: higher is better / -1: lower is better)
SCORES = {"cka": ("cka", 1.0), "ls": ("ls_residual", -1.0), "kl": ("kl", -1.0)}
#: images per batch of the maps (the unbiased CKA is a mean over batches of at least 4 images)
SELECTION_BATCH = 64


def edge_units(front_units: Sequence[Unit], end_units: Sequence[Unit], j: int, k: int) -> tuple[int, int]:
    """Position (j, k) of two plain (one-stage) anchors as a map edge (front unit, end unit): the unit of the front's
    block j, and the end's unit before its block k (before its final norm when k is its depth), by the one rule of
    `snnet.stitching.adapter.entry_unit` (SN-Net's routes and the least-squares init pair them the same way)."""
    fb, eb = block_units(front_units), block_units(end_units)
    if (0, j) not in fb or not 0 <= k <= len(eb):
        raise ConfigError(f"position ({j}, {k}) is outside the anchors' blocks: j in 0..{len(fb) - 1}, k in "
                          f"0..{len(eb)}")
    return fb[(0, j)], entry_unit(end_units, 0, k, eb) - 1


def stitchable_positions(net, cuts, a: int, b: int) -> list[tuple[int, int, int, int]]:
    """The candidate positions of anchors a -> b of an anchors-only ComposedNet that can be stitched, from the units'
    cut points (`snnet.stitching.cut.probe`, or the maps' own): (j, k, front unit, end unit) in (j, k) order. The one
    enumeration of the selection and of the preflight's structural check."""
    depth_a, depth_b = len(block_units(net.units[a])), len(block_units(net.units[b]))
    out = []
    for j in range(depth_a):
        for k in range(depth_b + 1):
            ux, uy = edge_units(net.units[a], net.units[b], j, k)
            if why_not_stitchable(cuts[a][ux], cuts[b][uy]) is None:
                out.append((j, k, ux, uy))
    return out


def _check_per_pair(net, a: int, b: int, found: int, per_pair: int) -> None:
    if found < per_pair:
        raise ConfigError(f"'positions': per_pair {per_pair} but {net.names[a]!r} -> {net.names[b]!r} has "
                          f"{found} stitchable positions; use 'per_pair' <= {found}")


def check_selectable(cfg: StitchConfig, models: Sequence[nn.Module], adapters, img_size, in_chans: int = 3) -> None:
    """Refuse a ``"positions": {"select": ..., "per_pair": K}`` that no data could satisfy (a pair with fewer than K
    stitchable positions), from the anchors' structure alone (`structure_only` anchors do; no image is read)."""
    net = anchors_net(models, adapters, cfg.labels())
    cuts = probe(net, img_size, in_chans)
    for a in range(net.n_anchors - 1):
        _check_per_pair(net, a, a + 1, len(stitchable_positions(net, cuts, a, a + 1)), cfg.get("positions")["per_pair"])


def select_positions(net, batches, score: str, per_pair: int) -> tuple[list[list[list[int]]], dict[str, Any]]:
    """The `per_pair` best positions of each neighbouring anchor pair of `net` (an anchors-only ComposedNet, e.g.
    similarity.anchors_net) by `score` on `batches` (clean image tensors, a list: they are read twice).

    Returns (pairs, info): per pair the chosen [j, k], sorted by (j, k) (the plan's cfg_id order); info records the
    request, the images and every candidate's score (JSON-able)."""
    key, sign = SCORES[score]
    pairs = [(a, a + 1) for a in range(net.n_anchors - 1)]
    maps = compatibility_maps(net, batches, pairs=pairs, kl=score == "kl")
    chosen, candidates = [], []
    for a, b in pairs:
        scored = [(j, k, v) for j, k, ux, uy in stitchable_positions(net, maps.cuts, a, b)
                  if (v := maps.value(key, (a, ux, b, uy))) is not None]
        _check_per_pair(net, a, b, len(scored), per_pair)
        best = sorted(scored, key=lambda t: (-sign * t[2], t[0], t[1]))[:per_pair]
        chosen.append(sorted([j, k] for j, k, _ in best))
        candidates.append([[j, k, round(v, 6)] for j, k, v in scored])
    info = {"select": score, "per_pair": per_pair, "map": key, "images": maps.images,
            "candidates": candidates}  # per pair: [j, k, score] of every stitchable position
    return chosen, info


def with_positions(cfg: StitchConfig, pairs: list, info: dict[str, Any]) -> StitchConfig:
    """A copy of `cfg` whose ``"positions"`` are the explicit `pairs` (with `info` as ``"from"``)."""
    return StitchConfig(list(cfg.anchors), {**cfg.values, "positions": {"pairs": pairs, "from": info}}, cfg.path)


def plan_config(cfg: StitchConfig) -> dict[str, Any]:
    """The stitch config as JSON data, checkpoints as absolute paths (the file is read from elsewhere)."""
    anchors = []
    for a in cfg.anchors:
        entry: dict[str, Any] = {"name": a.name}
        if a.checkpoint is not None:
            entry["checkpoint"] = os.path.abspath(a.checkpoint)
        if a.model_kwargs:
            entry["model_kwargs"] = dict(a.model_kwargs)
        if a.label is not None:  # routes and results name the anchor by it
            entry["label"] = a.label
        anchors.append(entry)
    return {"anchors": anchors, **cfg.values}


def write_stitch_plan(net: nn.Module, out_dir: str | os.PathLike) -> Path | None:
    """``<out_dir>/stitch_plan.json`` (atomically) when `net` was built from a config with ``"positions"``: that
    config with the explicit positions, loadable with --stitch_config. None otherwise."""
    cfg = getattr(net, "stitch_config", None)
    if cfg is None or cfg.get("positions") is None:
        return None
    path = Path(out_dir) / PLAN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(plan_config(cfg), indent=1) + "\n")
    _logger.info(f"stitch plan (explicit positions) written to {path}: rebuild this network with --stitch_config "
                 f"{path}")
    return path


class Selection:
    """``"positions": {"select": ...}`` in train.py: picks the positions on the built anchors (the weights the SN-Net
    is then built on) and returns the config with them explicit, before the SN-Net exists.

    `images_from` is the training split (None: it is loaded, as for an --eval run, so an evaluation selects on the
    same images as the training run did)."""

    def __init__(self, options: SelectionOptions, images_from=None):
        self.options, self.images_from = options, images_from

    def images(self, cfg: StitchConfig, largest: nn.Module) -> list[torch.Tensor]:
        options = self.options
        # as train.py's (the SN-Net's is the largest's)
        data_cfg = resolve_data_config(dict(options.data_config), model=largest)
        dataset = self.images_from
        if dataset is None:
            dataset = create_datasets(options.data, need_train=True)[0]
            if dataset is None:
                raise DataError(f"'positions' selects on training images and {options.data.data_dir!r} has no "
                                f"training split; add it, or pass the stitch_plan.json of the training run")
        count = options.init_images or cfg.get("stitch_init_bs")
        return list(clean_images(dataset, data_cfg, count, options.data.seed, 0, 1, batch_size=SELECTION_BATCH))

    def __call__(self, cfg: StitchConfig, models: Sequence[nn.Module], adapters) -> StitchConfig:
        request = cfg.get("positions")
        labels = cfg.labels()
        t0 = time.perf_counter()
        modes = {m: m.training for model in models for m in model.modules()}
        device = torch.device(self.options.device or "cpu")
        net = anchors_net(models, adapters, labels).to(device)
        try:
            batches = self.images(cfg, models[-1])
            if sum(x.shape[0] for x in batches) < 4:
                raise ConfigError(f"'positions' selects on the LS-init images, but stitch_init_bs gives "
                                  f"{sum(x.shape[0] for x in batches)}; use at least 4 (CKA needs 4 per batch)")
            pairs, info = select_positions(net, batches, request["select"], request["per_pair"])
        except SimilarityError as e:
            raise ConfigError(f"'positions': {e}") from None
        finally:
            net.to("cpu")
            for m, training in modes.items():
                m.training = training
        info["seed"] = self.options.data.seed
        info["data"] = str(self.options.data.data_dir)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            box = [(pairs, info)]  # rank 0's choice everywhere (GPU kernels may break near-ties differently)
            torch.distributed.broadcast_object_list(box, src=0)
            pairs, info = box[0]
        _logger.info(f"positions: {request['per_pair']} per anchor pair by {request['select']} on {info['images']} "
                     f"clean training images in {time.perf_counter() - t0:.1f}s: " +
                     "; ".join(f"{labels[c]} -> {labels[c + 1]}: {[tuple(p) for p in ps]}"
                               for c, ps in enumerate(pairs)))
        return with_positions(cfg, pairs, info)
