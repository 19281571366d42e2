"""Evaluation: the loop that evaluates stitches in one pass over the data (`evaluate_stitches`), the validation panel
after each epoch (`validate_stitches`) and the final evaluation of every stitch into a results file, with the chosen
stitches' per-image predictions next to it (`evaluate_all`)."""
from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from snnet.data.checks import DataError
from snnet.data.datasets import class_names_of, data_source
from snnet.data.loaders import create_eval_loader
from snnet.results.predictions import (
    build_predictions,
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
from snnet.stitching.route_tree import RouteTree
from snnet.train.device import amp_context, unwrap
from snnet.train.options import EvalOptions, RunOptions
from snnet.utils.distributed import all_gather_rows, all_reduce_sum, world
from snnet.utils.errors import UsageError
from snnet.utils.progress import Progress

_logger = logging.getLogger("snnet")


class Batches(Protocol):
    """What the loops read: batches with a length (a DataLoader, or a list of (images, labels) pairs)."""

    def __iter__(self) -> Iterator[Any]: ...

    def __len__(self) -> int: ...




class _Counts:
    """Per-stitch sums (top-1 hits, top-5 hits, loss, samples) in float64, reduced over ranks at the end. The sums
    stay on the logits' device until then: no host sync per stitch and batch (on CUDA each would wait for the GPU)."""

    def __init__(self, cfg_ids: Sequence[int]):
        self.rows = {c: i for i, c in enumerate(cfg_ids)}
        self.table = torch.zeros(len(cfg_ids), 4, dtype=torch.float64)

    def add(self, cfg_id: int, logits: torch.Tensor, y: torch.Tensor) -> None:
        logits = logits.float()
        if self.table.device != logits.device:  # the first batch: the sums move to where the logits are
            self.table = self.table.to(logits.device)
        hit = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(y[:, None])
        row = self.table[self.rows[cfg_id]]
        row[0] += hit[:, :1].sum()
        row[1] += hit.sum()
        row[2] += F.cross_entropy(logits, y, reduction="sum").double()
        row[3] += y.shape[0]

    def metrics(self) -> OrderedDict[int, dict[str, float]]:
        if world()[1] > 1:
            self.table = all_reduce_sum(self.table)
        table = self.table.cpu()  # the one host sync of the evaluation
        out = OrderedDict()
        for cfg_id, row in self.rows.items():
            c1, c5, loss, n = table[row].tolist()
            n = max(n, 1)
            out[cfg_id] = {"acc1": 100.0 * c1 / n, "acc5": 100.0 * c5 / n, "loss": loss / n, "samples": int(n)}
        return out


class PerImage:
    """Per-image predictions of chosen stitches (``--save-predictions``): each image's sample id and label, and per
    stitch its top-5 classes and top softmax probability (no logits). Collected per batch on each rank; `gather`
    joins the ranks' shards on every rank, ordered by sample id. Stitches not chosen cost nothing."""

    def __init__(self, cfg_ids: Sequence[int]):
        self.cfg_ids = sorted(set(cfg_ids))
        self.ids: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.top: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {c: [] for c in self.cfg_ids}
        self.arrays: dict[str, Any] | None = None   # after `gather`: sample_id, label, per_stitch {cfg: (topk, p)}
        self.num_classes = 0

    def batch(self, ids: torch.Tensor, y: torch.Tensor) -> None:
        self.ids.append(ids.detach().to("cpu", torch.int64).reshape(-1))
        self.labels.append(y.detach().to("cpu", torch.int64).reshape(-1))

    def add(self, cfg_id: int, logits: torch.Tensor) -> None:
        logits = logits.float()
        self.num_classes = logits.shape[1]
        top = logits.topk(min(5, logits.shape[1]), dim=1)  # the indices _Counts scores: the same top-1
        prob = (top.values[:, 0] - torch.logsumexp(logits, dim=1)).exp()
        self.top[cfg_id].append((top.indices.to("cpu", torch.int64), prob.to("cpu", torch.float32)))

    def gather(self) -> None:
        if world()[1] > 1:  # a rank without images learns the number of classes from the others
            classes = all_gather_rows(torch.tensor([[self.num_classes]], dtype=torch.int64))
            self.num_classes = int(classes.max())
        k = min(5, self.num_classes)
        ints = torch.cat([torch.stack([torch.cat(self.ids), torch.cat(self.labels)], 1)] +
                         [torch.cat([t for t, _ in self.top[c]]) for c in self.cfg_ids], 1) if self.ids else \
            torch.zeros(0, 2 + k * len(self.cfg_ids), dtype=torch.int64)
        probs = torch.stack([torch.cat([p for _, p in self.top[c]]) for c in self.cfg_ids], 1) if self.ids else \
            torch.zeros(0, len(self.cfg_ids))
        if world()[1] > 1:
            ints, probs = all_gather_rows(ints), all_gather_rows(probs)
        ints, probs = ints.numpy(), probs.numpy()
        ids, first = np.unique(ints[:, 0], return_index=True)  # ascending sample ids, each image once
        ints, probs = ints[first], probs[first]
        self.arrays = {"sample_id": ids, "label": ints[:, 1], "per_stitch": {
            c: (ints[:, 2 + i * k: 2 + (i + 1) * k], probs[:, i]) for i, c in enumerate(self.cfg_ids)}}


@torch.no_grad()
def evaluate_stitches(net: nn.Module, loader: Batches, cfg_ids: Sequence[int], device: torch.device,
                      amp_dtype: torch.dtype | None = None, log_interval: int = 50, per_image: PerImage | None = None
                      ) -> OrderedDict[int, dict[str, float]]:
    """Top-1/top-5 (percent) and mean cross-entropy per stitch, reduced over ranks.

    One pass over the data for all stitches: each batch is decoded once and the routes are walked as a trie, so each
    distinct prefix is computed once per batch (snnet/stitching/route_tree.py).

    A batch is (images, labels) or (images, labels, sample ids) (`create_eval_loader`). Its images are one tensor,
    read by every route, or a list of tensors of the same images preprocessed
    per input group (`create_eval_loader` with several data configs), of which each route reads its front
    anchor's (``model.route_input``: a `ComposedNet`'s ``input_groups``): one tensor per root of the trie.

    `per_image` (a `PerImage`) also records the per-image predictions of its stitches, which must be among
    `cfg_ids`; it needs batches with sample ids (a single process may go without: images are then numbered in order).
    """
    net.eval()
    model = unwrap(net)
    routes = {c: model.routes[model.check_cfg_id(c)] for c in cfg_ids}
    tree = RouteTree(routes)
    counts = _Counts(cfg_ids)
    progress = Progress(f"Eval {len(cfg_ids)} stitch(es)", len(loader), log_interval,
                        per_phase=(len(cfg_ids), "stitches"))
    seen = 0
    if per_image is not None and set(per_image.cfg_ids) - set(cfg_ids):
        raise ValueError(f"per-image predictions of cfg_ids {sorted(set(per_image.cfg_ids) - set(cfg_ids))} that "
                         f"are not evaluated")
    for i, batch in enumerate(loader, start=1):
        x, y = batch[0], batch[1].to(device, non_blocking=True)  # batch[2], when there: the images' sample ids
        if isinstance(x, torch.Tensor):
            x = x.to(device, non_blocking=True)
            inputs = x
        else:  # one tensor per input group: each route reads its front anchor's
            x = [t.to(device, non_blocking=True) for t in x]
            inputs = lambda first_step, x=x: model.route_input(x, first_step)
        emit = lambda cfg_id, logits, y=y: counts.add(cfg_id, logits, y)
        if per_image is not None:
            emit = _recording(emit, per_image, batch, y, seen)
            seen += y.shape[0]
        with amp_context(device, amp_dtype):
            tree.run(model.run_step, inputs, emit)
        progress.update(i, y.shape[0])
    if per_image is not None:
        per_image.gather()
    return counts.metrics()


def _recording(emit: Callable, per_image: PerImage, batch: Sequence, y: torch.Tensor, seen: int) -> Callable:
    """`emit` that also records the chosen stitches' predictions of this batch."""
    if len(batch) > 2:
        ids = torch.as_tensor(batch[2])
    elif world()[1] == 1:
        ids = torch.arange(seen, seen + y.shape[0])
    else:
        raise ValueError("per-image predictions under several processes need batches with sample ids "
                         "(create_eval_loader's (images, labels, ids))")
    per_image.batch(ids, y)
    chosen = set(per_image.cfg_ids)

    def both(cfg_id: int, logits: torch.Tensor) -> None:
        emit(cfg_id, logits)
        if cfg_id in chosen:
            per_image.add(cfg_id, logits)
    return both


def panel_cfg_ids(options: EvalOptions, model: RoutedNet, extra: int = 4) -> list[int]:
    """The validation panel: the cfg_ids validated after each epoch (--val-stitches; default the anchors and `extra`
    evenly spread stitches; the full sweep runs at the end). Refuses cfg_ids the network lacks and a top1@ID
    --eval-metric outside the panel."""
    given = options.val_stitches
    if given is None:
        stitched = list(range(model.n_anchors, model.num_configs))
        step = max(1, len(stitched) // max(extra, 1))
        panel = list(range(model.n_anchors)) + stitched[step // 2::step][:extra]
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


def validate_stitches(net: nn.Module, val_loader: Any, panel: list[int], options: RunOptions, input_size: Sequence[int],
                   epoch: int, train_loss: float, label: str = "") -> dict[str, float]:
    """The panel's metrics after an epoch (`input_size`: the network's (C, H, W), for the front's FLOPs): mean loss,
    top-1 and top-5, each stitch's top-1 and, when the panel is every stitch, the front's hypervolume; one log line.
    Returns the metrics by name (loss, top1, top5, top1@<cfg_id>, front_hv)."""
    m = evaluate_stitches(net, val_loader, panel, options.device, options.amp_dtype, options.eval.log_interval)
    metrics = {"loss": sum(v["loss"] for v in m.values()) / len(m), "top1": sum(v["acc1"] for v in m.values()) / len(m),
               "top5": sum(v["acc5"] for v in m.values()) / len(m)}
    metrics.update({f"top1@{c}": v["acc1"] for c, v in m.items()})
    model, front = unwrap(net), ""
    if len(panel) == model.num_configs and model.num_configs > 1:  # every stitch: the front's quality too
        table = cost_table(model, (int(input_size[1]), int(input_size[2])), int(input_size[0]))
        records = [{"cfg_id": c, "flops": table.route_flops(model.routes[c]), "acc1": v["acc1"]} for c, v in m.items()]
        metrics["front_hv"] = front_quality(records, range(model.n_anchors))["hypervolume"]
        front = f"; front hypervolume {metrics['front_hv']:.3f}"
    shown = panel if len(panel) <= 12 else f"all {len(panel)} stitches"
    _logger.info(f"epoch {epoch}{label}: train loss {train_loss:.4f}; panel {shown} mean top-1 {metrics['top1']:.3f} "
                 f"loss {metrics['loss']:.4f}{front}")
    return metrics


def evaluate_all(net: nn.Module, val_ds: Any, options: RunOptions, data_cfg: dict[str, Any], identity: str,
                 ckpt_hash: str, results_name: str = RESULTS_FILE, set_aside: bool = False) -> dict:
    """Every stitch of `net` on the validation set `val_ds`, preprocessed by `data_cfg` (timm's data config), into
    <options.out_dir>/<results_name> (stitches_res.txt, or stitches_res_ema.txt for the --model-ema weights): one
    JSON line per stitch, tied to the network's `identity` and the weights' `ckpt_hash`; stitches already in the file
    for both are not evaluated again. A file of other weights is refused, or with `set_aside` (a training run's own
    final evaluation: the file is its earlier end's, before --auto-resume trained on) renamed with its checkpoint's
    hash, with the predictions beside it (`set_aside_stale`). Returns the metrics by cfg_id of the stitches
    evaluated now."""
    rank, world_size = world()
    if val_ds is None:
        raise DataError(f"no validation split in {options.data.data_dir!r} to evaluate the stitches on")
    model, out_dir = unwrap(net), options.out_dir
    results = ResultsFile(out_dir / results_name, ckpt_hash, text_sha256(identity), data_source(val_ds))
    done: dict = {}
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        done = set_aside_stale(results) if set_aside else results.completed()
    chosen = prediction_ids(options.eval.save_predictions, model)
    redo = _predictions_missing(results.path, done, chosen) if rank == 0 else []
    if world_size > 1:  # every rank evaluates the same remaining stitches
        box = [sorted(done), redo]
        torch.distributed.broadcast_object_list(box, src=0)
        done, redo = dict.fromkeys(box[0]), box[1]
    todo = sorted({c for c in range(model.num_configs) if c not in done} | set(redo))
    if not todo:
        _logger.info(f"all {model.num_configs} stitches already evaluated in {results.path}")
        return done
    table = cost_table(model, tuple(data_cfg["input_size"][1:]), data_cfg["input_size"][0])
    _logger.info(f"evaluating {len(todo)} stitch(es) ({len(done)} already in {results.path}"
                 + (f"; {len(redo)} again for their per-image predictions" if redo else "") + f") on "
                 f"{len(val_ds)} images, {world_size} process(es)")
    loader = create_eval_loader(val_ds, options.loader, data_cfg, rank, world_size)
    per_image = PerImage([c for c in chosen if c in todo]) if any(c in todo for c in chosen) else None
    metrics = evaluate_stitches(net, loader, todo, options.device, options.amp_dtype, options.eval.log_interval,
                                per_image=per_image)
    records = []
    for cfg_id, m in metrics.items():
        record = stitch_record(model, cfg_id, m, table.route_flops(model.routes[cfg_id]), data_cfg["input_size"],
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


def set_aside_stale(results: ResultsFile) -> dict[int, dict[str, Any]]:
    """`results.completed()`; a file that is not this evaluation's (other weights, config or data; or unreadable) is
    renamed, with the predictions file beside it, to <name>.<first 12 hex digits of its checkpoint_sha256><suffix>
    (kept, never mixed or overwritten), and nothing is completed."""
    try:
        return results.completed()
    except ResultsError:
        pass
    try:
        tag = str(json.loads(results.path.read_text().splitlines()[0])["checkpoint_sha256"])[:12]
    except (ValueError, KeyError, IndexError, TypeError, OSError):
        tag = "earlier"
    moved = []
    for path in (results.path, predictions_path(results.path)):
        if path.exists():
            dest, k = path.with_name(f"{path.stem}.{tag}{path.suffix}"), 1
            while dest.exists():
                k += 1
                dest = path.with_name(f"{path.stem}.{tag}-{k}{path.suffix}")
            path.rename(dest)
            moved.append(str(dest))
    _logger.info(f"{results.path} held another evaluation's results: kept as {', '.join(moved)}")
    return {}


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
    new = build_predictions(a["sample_id"], a["label"], a["per_stitch"], records, per_image.num_classes)
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
