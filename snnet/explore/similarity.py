"""`snnet similarity`: the compatibility maps of two or more anchors (stitching/maps.py) on a data folder, written as
JSON, CSV and heatmaps."""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from snnet.data.checks import DataError, check_data
from snnet.data.datasets import create_datasets, num_classes_of
from snnet.data.ls_images import clean_images
from snnet.data.options import DataOptions, LoaderOptions
from snnet.data.transforms import anchor_data_configs
from snnet.stitching.adapter import adapter_for
from snnet.stitching.build import check_model_name, create_anchor
from snnet.stitching.config import StitchConfig, load_stitch_config, parse_anchor
from snnet.stitching.maps import SCORES, CompatibilityMaps, SimilarityError, anchors_net, compatibility_maps
from snnet.stitching.model import ComposedNet
from snnet.train.device import device_from_flag
from snnet.utils.fileio import check_out_dir, save_figure, write_text_atomic


# ---------------------------------------------------------------------------------------------------- files
def number(v: float) -> str:
    """A score as a heatmap cell or summary shows it: 2 decimals, or 2 significant digits in e-notation when that
    would print 0.00 (KL of ~1e-4 is common)."""
    if v == 0 or 0.01 <= abs(v) < 1000:
        return f"{v:.2f}"
    mant, exp = f"{v:.1e}".split("e")
    return f"{mant}e{int(exp)}"


def _scale(tables: Sequence[np.ndarray], kind: str):
    """One colour scale per score, shared by every panel: CKA and the residual on [0, 1]; KL from 0 to its largest
    value over all pairs, on a log scale when its finite values span more than two decades."""
    from matplotlib.colors import LogNorm, Normalize  # heavy (~0.5 s), needed only once maps are drawn
    if kind != "kl":
        return Normalize(0.0, 1.0)
    values = np.concatenate([t[np.isfinite(t)].ravel() for t in tables]) if tables else np.zeros(0)
    top = float(values.max()) if values.size else 1.0
    positive = values[values > 0]
    if positive.size and top / float(positive.min()) > 100:
        return LogNorm(max(float(positive.min()), top * 1e-6), top)
    return Normalize(0.0, max(top, 1e-12))


def _heatmaps(maps: CompatibilityMaps, kind: str, path: Path) -> None:
    import matplotlib  # heavy (~0.5 s), needed only once maps are drawn; Agg before pyplot
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    table = {"cka": maps.cka, "ls_residual": maps.ls_residual, "kl": maps.kl}[kind]
    if table is None:  # the KL map, when it was skipped (write_maps draws only the maps it has)
        raise ValueError(f"no {kind} map to draw")
    pairs = [p for p in maps.pairs if kind != "cka" or p[0] < p[1] or (p[1], p[0]) not in maps.pairs]
    cols = min(3, len(pairs))
    rows = math.ceil(len(pairs) / cols)
    cell = 0.32
    widths = [max(len(maps.cuts[b]) * cell + 2.5, 4.0) for _, b in pairs]
    heights = [max(len(maps.cuts[a]) * cell + 2.0, 3.5) for a, _ in pairs]
    fig, axes = plt.subplots(rows, cols, figsize=(max(widths) * cols, max(heights) * rows), squeeze=False)
    style = {"cka": ("viridis", "linear CKA (unbiased)"),
             "ls_residual": ("viridis_r", "least-squares stitch residual (relative)"),
             "kl": ("magma_r", "KL(end || stitched), nats")}[kind]
    cmap = plt.get_cmap(style[0]).with_extremes(bad="0.85")
    norm = _scale([np.asarray(table[p], dtype=float) for p in pairs], kind)
    for ax, (a, b) in zip(axes.flat, pairs):
        m = np.ma.masked_invalid(table[(a, b)])
        im = ax.imshow(m, cmap=cmap, norm=norm, aspect="auto")
        ax.set_xticks(range(len(maps.cuts[b])), [c.name for c in maps.cuts[b]], rotation=90, fontsize=7)
        ax.set_yticks(range(len(maps.cuts[a])), [c.name for c in maps.cuts[a]], fontsize=7)
        ax.set_xlabel(f"end: {maps.names[b]} (unit j)", fontsize=8)
        ax.set_ylabel(f"front: {maps.names[a]} (unit i)", fontsize=8)
        ax.set_title(f"{maps.names[a]} \u2192 {maps.names[b]}", fontsize=9)
        if m.shape[0] * m.shape[1] <= 400:
            for i in range(m.shape[0]):
                for j in range(m.shape[1]):
                    if not np.ma.is_masked(m[i, j]):
                        low = float(norm(float(m[i, j]))) < 0.5  # viridis is dark when low, magma_r when high
                        ax.text(j, i, number(float(m[i, j])), ha="center", va="center", fontsize=5.5,
                                color="white" if low == (kind == "cka") else "black")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    for ax in list(axes.flat)[len(pairs):]:
        ax.axis("off")
    grey = "" if kind == "cka" else " (grey: no linear stitch)"
    fig.suptitle(f"{style[1]}; {maps.images} images{grey}; one colour scale for every panel", fontsize=10)
    save_figure(fig, path, dpi=110)


def write_maps(maps: CompatibilityMaps, out_dir: str | os.PathLike, meta: dict[str, Any] | None = None) -> list[Path]:
    """similarity.json, similarity.csv and one heatmap PNG per score (<score>.png), each written atomically."""
    out = Path(out_dir)
    files = [out / "similarity.json", out / "similarity.csv"]
    write_text_atomic(files[0], json.dumps(maps.to_json(meta), indent=1) + "\n")
    write_text_atomic(files[1], maps.csv_text())
    for kind in SCORES:
        if kind == "kl" and maps.kl is None:
            continue
        files.append(out / f"{kind}.png")
        _heatmaps(maps, kind, files[-1])
    return files


# ---------------------------------------------------------------------------------------------------- anchors, data
def anchor_specs(anchors: Sequence[str] | None, stitch_config: str | None):
    """The anchors' specs (a StitchConfig) from ``--anchors`` (each in the one anchor syntax of
    `snnet.stitching.config.parse_anchor`: NAME, NAME:CHECKPOINT, FILE#INDEX or a JSON anchor object) or from a stitch
    config's anchors list (exactly one of the two)."""
    if bool(anchors) == bool(stitch_config):
        raise SimilarityError("name the anchors with --anchors A B ... or --stitch_config CFG (one of the two)")
    if stitch_config:
        return load_stitch_config(stitch_config)
    return StitchConfig([parse_anchor(text, "--anchors") for text in anchors or ()], {})


def build_anchors(cfg, pretrained: bool, num_classes: int | None, img_size: int | None,
                  in_chans: int | None = None) -> ComposedNet:
    """The anchors of a stitch config (timm, local checkpoints), each a route of its own, in eval mode; each anchor
    reads its own preprocessing of a per-group batch (``input_groups`` from `data_configs`; a single tensor is read
    by every anchor)."""
    for a in cfg.anchors:
        check_model_name(a.name)
    models = [create_anchor(a, pretrained, num_classes=num_classes, img_size=img_size, in_chans=in_chans)
              for a in cfg.anchors]
    labels = cfg.labels()
    adapters = [adapter_for(m, n) for m, n in zip(models, labels)]
    return anchors_net(models, adapters, labels, _resolve(models, img_size)[2])


@dataclass(frozen=True)
class SimilarityOptions:
    """What `snnet similarity` and `snnet search` read besides the data (`DataOptions`, `data_options`) and its
    loading (`LoaderOptions`, `loader_options`: the batch size): the anchors, the calibration draw, the output."""
    out: str                              # output folder
    anchors: tuple[str, ...] = ()         # each in the anchor syntax of `snnet.stitching.config.parse_anchor`
    stitch_config: str | None = None      # or the anchors of this stitch config (exactly one of the two)
    batches: int = 4                      # calibration batches
    img_size: int | None = None           # None: the config's input_size, else each anchor's own
    pretrained: bool = True               # timm's pretrained weights where an anchor names no checkpoint
    seed: int = 0                         # which calibration images are drawn


def data_options(data_dir: str | os.PathLike, num_classes: int | None = None) -> DataOptions:
    """The tools' data: an ImageFolder root. They read batches of any size from the training split (no epoch, no
    optimizer step), so the steps check sees batches of 1."""
    return DataOptions(data_dir=str(data_dir), num_classes=num_classes, seed=0, batch_size=1)


def loader_options(batch_size: int, workers: int = 0) -> LoaderOptions:
    """The evaluation loader of the tools: `batch_size` images per batch, read in this process."""
    return LoaderOptions(batch_size=batch_size, validation_batch_size=batch_size, workers=workers)


def _resolve(models, img_size: int | None):
    return anchor_data_configs(models, {"img_size": img_size} if img_size else {})


def data_configs(net: ComposedNet, img_size: int | None) -> tuple[list[dict], list[dict], list[int]]:
    """Each anchor's own evaluation preprocessing (timm's resolve_data_config on that anchor, `img_size` over it):
    (per anchor, distinct, group) as snnet.data.transforms.anchor_data_configs gives them. Load images with the distinct
    configs (a list of tensors per batch); anchor a reads tensor ``group[a]``, the net's ``input_groups`` as
    `build_anchors` sets them. (Feeding every anchor one anchor's preprocessing made the numbers depend on the
    anchors' order.)"""
    return _resolve([net.anchor(a) for a in range(net.n_anchors)], img_size)


def calibration_batches(dataset, data_cfg: dict[str, Any] | Sequence[dict[str, Any]], batches: int, batch_size: int,
                        seed: int = 0) -> list:
    """`batches` x `batch_size` clean images drawn at random (seeded) from `dataset`, kept in memory (the maps read
    them twice). With several data configs (the distinct ones of `data_configs`) each batch is a list of tensors of
    the same images, one per config."""
    return list(clean_images(dataset, data_cfg, batches * batch_size, seed, batch_size=batch_size))


@dataclass
class ExploreSetup:
    """What both commands build from their arguments, every input checked before any image is read."""
    out: Path
    cfg: Any                 # StitchConfig: the anchors' specs
    net: ComposedNet         # the anchors, each its own route, on `device`
    device: torch.device
    data: DataOptions        # which images
    loader: LoaderOptions    # how they are loaded
    train: Any
    val: Any
    num_classes: int | None
    img_size: int | None
    data_cfgs: list[dict[str, Any]]   # per anchor: its own evaluation preprocessing
    input_cfgs: list[dict[str, Any]]  # the distinct ones: one tensor each per batch (net.input_groups indexes them)


def prepare(options: SimilarityOptions, data: DataOptions, loader: LoaderOptions, device: str | None, need_train: bool,
            what: str, need_val: bool = False) -> ExploreSetup:
    """Output folder, batch size, device (`device_from_flag`: None is cuda when available), anchors (>= 2), data
    folder, then the anchors themselves."""
    out = check_out_dir(options.out)
    if loader.batch_size < 4:
        raise SimilarityError(f"--batch-size {loader.batch_size}: the unbiased CKA needs at least 4 images per batch; "
                              f"use -b 4 or more")
    on = device_from_flag(device)
    cfg = anchor_specs(options.anchors, options.stitch_config)
    if len(cfg.anchors) < 2:
        raise SimilarityError(f"{what} needs at least two anchors, got {len(cfg.anchors)}; add one to --anchors or "
                              f"the config")
    check_data(data, need_train=need_train, world_size=1)
    train, val = create_datasets(data, need_train=need_train)
    if need_val and val is None:
        raise DataError(f"data folder {data.data_dir!r} has no validation/ or val/ folder to evaluate on")
    classes = data.num_classes or cfg.get("num_classes") or num_classes_of(train if need_train else val)
    img_size = options.img_size or cfg.get("input_size")
    net = build_anchors(cfg, options.pretrained, classes, img_size).to(on)
    per_anchor, distinct, _ = data_configs(net, img_size)
    return ExploreSetup(out, cfg, net, on, data, loader, train, val, classes, img_size, per_anchor, distinct)


def anchor_records(run: ExploreSetup) -> list[dict[str, Any]]:
    """Per anchor: its spec and the preprocessing it was fed (JSON-able)."""
    return [{"name": a.name, "checkpoint": a.checkpoint, "model_kwargs": a.model_kwargs,
             "data_config": dict(c)} for a, c in zip(run.cfg.anchors, run.data_cfgs)]


def run_similarity(options: SimilarityOptions, data: DataOptions, loader: LoaderOptions, device: str | None = None,
                   split: str = "train", kl: bool = True) -> list[Path]:
    """`snnet similarity`: anchors, clean images of one split (train or val), the three maps (`kl`: with the KL map),
    the files."""
    run = prepare(options, data, loader, device, split == "train", "compatibility maps")
    t0 = time.perf_counter()
    images = calibration_batches(run.train if split == "train" else run.val, run.input_cfgs, options.batches,
                                 loader.batch_size, options.seed)
    maps = compatibility_maps(run.net, images, kl=kl)
    took = time.perf_counter() - t0
    meta = {"command": "snnet similarity", "data": str(data.data_dir), "split": split, "seconds": round(took, 2),
            "anchor_specs": anchor_records(run)}
    files = write_maps(maps, options.out, meta)
    print(summary(maps, took))
    print(f"wrote {', '.join(str(f) for f in files)}")
    return files


def best_stitches(maps: CompatibilityMaps, a: int, b: int, top: int = 5) -> list[tuple[int, int]]:
    """The `top` stitchable (unit i of a, unit j of b) of a pair: those with a least-squares stitch, lowest
    residual first (ties: higher CKA). Positions without a linear stitch are never listed."""
    edges = [(e[1], e[3]) for e in maps.stitches if (e[0], e[2]) == (a, b)]
    edges = [(i, j) for i, j in edges if maps.value("ls_residual", (a, i, b, j)) is not None]

    def key(e: tuple[int, int]) -> tuple:
        i, j = e
        cka = maps.value("cka", (a, i, b, j))
        return maps.value("ls_residual", (a, i, b, j)), -(cka if cka is not None else -math.inf), e
    return sorted(edges, key=key)[:top]


def summary(maps: CompatibilityMaps, seconds: float, top: int = 5) -> str:
    """A few lines: per ordered pair, how many unit pairs can be stitched and the best stitchable positions (lowest
    least-squares residual) with their CKA and KL."""
    lines = [f"compatibility maps of {len(maps.names)} anchors on {maps.images} images ({maps.batches} batches) in "
             f"{seconds:.1f}s"]
    for a, b in maps.pairs:
        stitchable = sum(1 for e in maps.stitches if (e[0], e[2]) == (a, b))
        few = sum(1 for e in maps.rows if (e[0], e[2]) == (a, b) and e not in maps.stitches)
        lines.append(f"{maps.names[a]} -> {maps.names[b]}: {stitchable} of "
                     f"{len(maps.cuts[a]) * len(maps.cuts[b])} unit pairs stitchable" +
                     (f" ({few} more left out: their stitch has as many unknowns as the {maps.images} images give "
                      f"rows, or more; use more images, --batches or -b)" if few else "") +
                     (f"; the best {min(top, stitchable)} by LS residual:" if stitchable else ""))
        name = lambda anchor, u: maps.cuts[anchor][u].name
        for i, j in best_stitches(maps, a, b, top):
            cka = maps.value("cka", (a, i, b, j))
            klv = maps.value("kl", (a, i, b, j)) if maps.kl is not None else None
            res = maps.value("ls_residual", (a, i, b, j))  # defined: best_stitches lists only those
            lines.append(f"  {name(a, i):>14} -> {name(b, j):<14} LS residual "
                         f"{number(res) if res is not None else 'n/a'}" +
                         (f", CKA {number(cka)}" if cka is not None else "") +
                         (f", KL {number(klv)}" if klv is not None else ""))
    return "\n".join(lines)
