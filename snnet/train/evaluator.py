"""Evaluation of a trained network: the validation panel after each epoch (`validate_panel`) and the final
evaluation of every stitch into a results file, with the chosen stitches' per-image predictions next to it
(`evaluate_all`). The loop over the data is `snnet.train.engine.evaluate_stitches`."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from snnet.data.checks import DataError
from snnet.data.datasets import class_names_of, data_source
from snnet.data.loaders import create_eval_loader
from snnet.data.options import LoaderOptions
from snnet.results.predictions import (
    build,
    merge,
    predictions_path,
    read_predictions,
    record_sha256,
    write_predictions,
)
from snnet.results.quality import front_quality
from snnet.results.records import (
    RESULTS_FILE,
    ResultsError,
    ResultsFile,
    stitch_record,
    text_sha256,
    write_class_names,
)
from snnet.stitching.cost import cost_table
from snnet.stitching.model import RoutedNet
from snnet.train.device import unwrap
from snnet.train.engine import PerImage, default_val_panel, evaluate_stitches
from snnet.train.options import EvalOptions
from snnet.utils.distributed import world
from snnet.utils.errors import UsageError

_logger = logging.getLogger("snnet")


@dataclass(frozen=True)
class Evaluation:
    """What an evaluation reads of its run: where results go, the network's identity (hashed into them), how the
    validation images are loaded and preprocessed, the device and precision, and the evaluation options."""
    out_dir: Path
    config_text: str
    loader: LoaderOptions
    data_cfg: dict[str, Any]
    device: torch.device
    amp_dtype: torch.dtype | None
    options: EvalOptions
    data_dir: str = ""                  # named when there is no validation split


def val_panel(options: EvalOptions, model: RoutedNet) -> list[int]:
    """The cfg_ids validated after each epoch (--val-stitches; default the anchors and a few stitches)."""
    given = options.val_stitches
    if given is None:
        panel = default_val_panel(model.num_configs, model.n_anchors)
    elif "all" in given:
        panel = list(range(model.num_configs))
    else:
        panel = [int(c) for c in given]
    bad = [c for c in panel if c >= model.num_configs]
    if bad:
        raise UsageError(f"--val-stitches {bad} out of range: this network has cfg_ids 0..{model.num_configs - 1}")
    metric = options.eval_metric
    if metric.startswith("top1@") and int(metric[5:]) not in panel:
        raise UsageError(f"--eval-metric {metric}: cfg_id {metric[5:]} is not in the validation panel {panel}; add "
                         f"it with --val-stitches or pick another metric")
    return panel


def validate_panel(net: nn.Module, val_loader: Any, panel: list[int], ev: Evaluation, epoch: int, train_loss: float,
                   label: str = "") -> dict[str, float]:
    """The panel's metrics after an epoch: mean loss, top-1 and top-5, each stitch's top-1 and, when the panel is
    every stitch, the front's hypervolume; one log line."""
    m = evaluate_stitches(net, val_loader, panel, ev.device, ev.amp_dtype, ev.options.log_interval)
    metrics = {"loss": sum(v["loss"] for v in m.values()) / len(m), "top1": sum(v["acc1"] for v in m.values()) / len(m),
               "top5": sum(v["acc5"] for v in m.values()) / len(m)}
    metrics.update({f"top1@{c}": v["acc1"] for c, v in m.items()})
    model, front = unwrap(net), ""
    if len(panel) == model.num_configs and model.num_configs > 1:  # every stitch: the front's quality too
        table = cost_table(model, tuple(ev.data_cfg["input_size"][1:]), ev.data_cfg["input_size"][0])
        records = [{"cfg_id": c, "flops": table.route_flops(model.routes[c]), "acc1": v["acc1"]} for c, v in m.items()]
        metrics["front_hv"] = front_quality(records, range(model.n_anchors))["hypervolume"]
        front = f"; front hypervolume {metrics['front_hv']:.3f}"
    shown = panel if len(panel) <= 12 else f"all {len(panel)} stitches"
    _logger.info(f"epoch {epoch}{label}: train loss {train_loss:.4f}; panel {shown} mean top-1 {metrics['top1']:.3f} "
                 f"loss {metrics['loss']:.4f}{front}")
    return metrics


def evaluate_all(net: nn.Module, val_ds: Any, ev: Evaluation, ckpt_hash: str,
                 results_name: str = RESULTS_FILE) -> dict:
    """Every stitch on the validation set; one JSON line per stitch in <out_dir>/<results_name> (stitches_res.txt,
    or stitches_res_ema.txt for the --model-ema weights)."""
    rank, world_size = world()
    if val_ds is None:
        raise DataError(f"no validation split in {ev.data_dir!r} to evaluate the stitches on")
    model = unwrap(net)
    results = ResultsFile(ev.out_dir / results_name, ckpt_hash, text_sha256(ev.config_text), data_source(val_ds))
    done: dict = {}
    if rank == 0:
        ev.out_dir.mkdir(parents=True, exist_ok=True)
        done = results.completed()
    chosen = prediction_ids(ev.options.save_predictions, model)
    redo = _predictions_missing(results.path, done, chosen) if rank == 0 else []
    if world_size > 1:  # every rank evaluates the same remaining stitches
        box = [sorted(done), redo]
        torch.distributed.broadcast_object_list(box, src=0)
        done, redo = dict.fromkeys(box[0]), box[1]
    todo = sorted({c for c in range(model.num_configs) if c not in done} | set(redo))
    if not todo:
        _logger.info(f"all {model.num_configs} stitches already evaluated in {results.path}")
        return done
    table = cost_table(model, tuple(ev.data_cfg["input_size"][1:]), ev.data_cfg["input_size"][0])
    _logger.info(f"evaluating {len(todo)} stitch(es) ({len(done)} already in {results.path}"
                 + (f"; {len(redo)} again for their per-image predictions" if redo else "") + f") on "
                 f"{len(val_ds)} images, {world_size} process(es)")
    loader = create_eval_loader(val_ds, ev.loader, ev.data_cfg, rank, world_size)
    per_image = PerImage([c for c in chosen if c in todo]) if any(c in todo for c in chosen) else None
    metrics = evaluate_stitches(net, loader, todo, ev.device, ev.amp_dtype, ev.options.log_interval,
                                per_image=per_image)
    records = []
    for cfg_id, m in metrics.items():
        record = stitch_record(model, cfg_id, m, table.route_flops(model.routes[cfg_id]), ev.data_cfg["input_size"],
                               data=data_source(val_ds))
        records.append(record)
        _logger.info(f"cfg {cfg_id:>3d} {record['route']}: acc1 {m['acc1']:.3f} acc5 {m['acc5']:.3f} "
                     f"loss {m['loss']:.4f} flops {record['flops'] / 1e9:.3f}G params {record['params'] / 1e6:.3f}M")
    if rank == 0:
        results.extend(records)
        write_class_names(results.path, class_names_of(val_ds))  # stitches_res.classes.json: what index i names
        _logger.info(f"results: {results.path}")
        if per_image is not None:
            _write_predictions(results, per_image)
    return metrics


def prediction_ids(spec: str, model: RoutedNet) -> list[int]:
    """The cfg_ids of --save-predictions (anchors, all, none, or comma-separated cfg_ids and 'anchors')."""
    if spec == "none":
        return []
    if spec == "all":
        return list(range(model.num_configs))
    ids: set[int] = set()
    for part in spec.split(","):
        ids |= set(range(model.n_anchors)) if part == "anchors" else {int(part)}
    bad = sorted(c for c in ids if c >= model.num_configs)
    if bad:
        raise UsageError(f"--save-predictions {spec}: cfg_id {bad} out of range; this network has cfg_ids "
                         f"0..{model.num_configs - 1}")
    return sorted(ids)


def _predictions_missing(results_file: Path, done: dict, chosen: list[int]) -> list[int]:
    """Chosen stitches already in the results file whose predictions the predictions file lacks (or holds for
    another record): evaluated again, so that both files stay of one evaluation."""
    have = [c for c in chosen if c in done]
    path = predictions_path(results_file)
    if not have:
        return []
    try:
        pred = read_predictions(path)
    except ResultsError:
        return have
    tied = pred.meta.get("record_sha256", {})
    return [c for c in have if tied.get(str(c)) != record_sha256(done[c])]


def _write_predictions(results: ResultsFile, per_image: PerImage) -> None:
    """The predictions of this evaluation, merged with those of earlier runs of the same evaluation, written
    atomically next to the results file and tied to its records."""
    path = predictions_path(results.path)
    records = results.completed()
    a = per_image.arrays
    assert a is not None  # gathered by evaluate_stitches
    new = build(a["sample_id"], a["label"], a["per_stitch"], records, per_image.num_classes)
    try:
        old = read_predictions(path) if path.exists() else None
    except ResultsError:
        old = None
    if old is not None:  # only stitches whose records are unchanged are kept
        keep = [int(c) for c in old.cfg_id if c in records and
                old.meta["record_sha256"].get(str(int(c))) == record_sha256(records[int(c)])]
        old = old.subset(keep) if keep else None
    pred = merge(old, new)
    write_predictions(path, pred)
    _logger.info(f"per-image predictions of cfg_id {pred.cfg_id.tolist()} ({len(pred.sample_id)} images): {path}")
