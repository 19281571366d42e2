"""Per-image predictions of chosen stitches: the one owner of the predictions file beside a results file.

`train.py` (``--save-predictions``, the anchors by default) writes, next to ``stitches_res.txt``, the file
``stitches_pred.npz`` (``stitches_res_ema.txt`` -> ``stitches_pred_ema.npz``): for each chosen stitch and each
validation image the top-5 classes (the first is the top-1), the top softmax probability and whether the top-1 is
right, plus each image's label and sample id once. No logits: 50,000 images x 3 anchors is about 2 MB. It is a
NumPy ``.npz`` of plain arrays (read with ``allow_pickle=False``), written atomically:

=============  ==================  ==========================================================================
array          dtype, shape        meaning
=============  ==================  ==========================================================================
``sample_id``  int64 [N]           each image's index in the whole validation split, ascending
``label``      int16/int32 [N]     its class
``cfg_id``     int32 [K]           the stitches held, ascending
``top5``       int16/int32 [K,N,k] their top-k classes (k = min(5, classes)), best first
``top_prob``   float32 [K,N]       softmax probability of the top-1 class
``correct``    bool [K,N]          top-1 == label
``meta``       uint8 [bytes]       UTF-8 JSON: format, checkpoint_sha256, config_sha256, record_sha256 per cfg_id
=============  ==================  ==========================================================================

Tie to the results: ``meta`` carries the checkpoint and config hashes of the evaluation and, per cfg_id, the hash of
that stitch's record (`record_sha256`: its evaluation fields only, so `snnet latency` adding a latency to the record
keeps the tie). `check_against` refuses predictions whose records changed or belong to another run, and any whose
top-1 count is not the record's acc1.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from snnet.results.records import RESULTS_FILE, ResultsError, results_path
from snnet.utils.fileio import atomic_path

FORMAT = "snnet-predictions"
VERSION = 1
PRED_FILE = "stitches_pred.npz"
#: the record fields an evaluation writes: what the predictions are tied to (later additions such as latencies are not)
RECORD_KEYS = ("cfg_id", "route", "flops", "params", "acc1", "acc5", "loss", "samples", "img_size",
               "checkpoint_sha256", "config_sha256")


def predictions_path(results: str | os.PathLike) -> Path:
    """The predictions file of a results file (or of an evaluation folder): stitches_res.txt -> stitches_pred.npz,
    stitches_res_ema.txt -> stitches_pred_ema.npz, NAME.txt -> NAME_pred.npz."""
    path = results_path(results)
    stem = path.stem
    if stem.startswith(Path(RESULTS_FILE).stem):
        return path.with_name(Path(PRED_FILE).stem + stem[len(Path(RESULTS_FILE).stem):] + Path(PRED_FILE).suffix)
    return path.with_name(stem + "_pred.npz")


def record_sha256(rec: dict[str, Any]) -> str:
    """Hash of a record's evaluation fields (canonical JSON)."""
    return hashlib.sha256(json.dumps({k: rec.get(k) for k in RECORD_KEYS}, sort_keys=True).encode()).hexdigest()


@dataclass
class Predictions:
    """The arrays of a predictions file; ``row(cfg_id)`` indexes the per-stitch arrays."""
    sample_id: np.ndarray
    label: np.ndarray
    cfg_id: np.ndarray
    top5: np.ndarray
    top_prob: np.ndarray
    correct: np.ndarray
    meta: dict[str, Any]

    def row(self, cfg_id: int) -> int:
        hits = np.flatnonzero(self.cfg_id == cfg_id)
        if not len(hits):
            raise ResultsError(f"the predictions hold no cfg_id {cfg_id} (they hold {self.cfg_id.tolist()}); "
                               f"evaluate again with --save-predictions naming it")
        return int(hits[0])

    def subset(self, keep: Sequence[int]) -> Predictions:
        rows = [self.row(c) for c in keep]
        meta = {**self.meta, "record_sha256": {str(c): self.meta["record_sha256"][str(c)] for c in keep}}
        return Predictions(self.sample_id, self.label, self.cfg_id[rows], self.top5[rows], self.top_prob[rows],
                           self.correct[rows], meta)


def class_dtype(num_classes: int) -> type:
    return np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32


def build_predictions(sample_id: np.ndarray, label: np.ndarray,
                      per_stitch: dict[int, tuple[np.ndarray, np.ndarray]], records: dict[int, dict[str, Any]],
                      num_classes: int) -> Predictions:
    """`Predictions` from gathered arrays: `sample_id` and `label` [N] per image, `per_stitch` cfg_id -> (top-k
    classes [N, k], top probability [N]) with rows in `sample_id` order, `records` cfg_id -> the stitch's results
    record (stamped with the run's hashes), `num_classes` for the class dtype."""
    ids = sorted(per_stitch)
    dt = class_dtype(num_classes)
    top5 = np.stack([per_stitch[c][0] for c in ids]).astype(dt)
    label = label.astype(dt)
    first = records[ids[0]]
    meta = {"format": FORMAT, "version": VERSION, "checkpoint_sha256": first.get("checkpoint_sha256"),
            "config_sha256": first.get("config_sha256"),
            "record_sha256": {str(c): record_sha256(records[c]) for c in ids}}
    return Predictions(sample_id.astype(np.int64), label, np.asarray(ids, dtype=np.int32), top5,
                       np.stack([per_stitch[c][1] for c in ids]).astype(np.float32), top5[:, :, 0] == label[None],
                       meta)


def merge(old: Predictions | None, new: Predictions) -> Predictions:
    """`new` plus the stitches of `old` it does not hold, when `old` is of the same evaluation (hashes, images and
    labels); otherwise `new` alone."""
    if old is None or (old.meta.get("checkpoint_sha256"), old.meta.get("config_sha256")) != \
            (new.meta.get("checkpoint_sha256"), new.meta.get("config_sha256")) or \
            not np.array_equal(old.sample_id, new.sample_id) or not np.array_equal(old.label, new.label) or \
            old.top5.shape[2] != new.top5.shape[2]:
        return new
    keep = [int(c) for c in old.cfg_id if c not in set(new.cfg_id.tolist())]
    if not keep:
        return new
    old = old.subset(keep)
    order = np.argsort(np.concatenate([new.cfg_id, old.cfg_id]), kind="stable")
    cat = lambda a, b: np.concatenate([a, b.astype(a.dtype)])[order]
    meta = {**new.meta, "record_sha256": {**old.meta["record_sha256"], **new.meta["record_sha256"]}}
    return Predictions(new.sample_id, new.label, cat(new.cfg_id, old.cfg_id), cat(new.top5, old.top5),
                       cat(new.top_prob, old.top_prob), cat(new.correct, old.correct), meta)


def write_predictions(path: str | os.PathLike, pred: Predictions) -> None:
    """One compressed .npz of plain arrays, written atomically."""
    meta = np.frombuffer(json.dumps(pred.meta, sort_keys=True).encode(), dtype=np.uint8)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, sample_id=pred.sample_id, label=pred.label, cfg_id=pred.cfg_id, top5=pred.top5,
                                top_prob=pred.top_prob, correct=pred.correct, meta=meta)


def read_predictions(path: str | os.PathLike) -> Predictions:
    """A predictions file, its arrays checked for shape and kind (never unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise ResultsError(f"predictions file {str(path)!r} does not exist; evaluate with train.py --eval "
                           f"--save-predictions anchors (the default) to write it next to the results file")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(arrays.pop("meta").tobytes().decode())
        pred = Predictions(meta=meta, **{k: arrays[k] for k in ("sample_id", "label", "cfg_id", "top5", "top_prob",
                                                                 "correct")})
    except (ValueError, KeyError, OSError, TypeError, UnicodeDecodeError, zipfile.BadZipFile, EOFError) as e:
        # BadZipFile: a file cut short (a copy or a disk that filled up) has no zip directory at its end
        raise ResultsError(f"{str(path)!r} is not a predictions file ({type(e).__name__}: {e}); regenerate it "
                           f"with train.py --eval --save-predictions") from None
    n, k = len(pred.sample_id), len(pred.cfg_id)
    if meta.get("format") != FORMAT or pred.label.shape != (n,) or pred.top5.ndim != 3 or \
            pred.top5.shape[:2] != (k, n) or pred.top_prob.shape != (k, n) or pred.correct.shape != (k, n) or \
            set(meta.get("record_sha256", {})) != {str(int(c)) for c in pred.cfg_id}:
        raise ResultsError(f"{str(path)!r} is not a well-formed predictions file (format {meta.get('format')!r}, "
                           f"{n} images, {k} stitches, arrays of mismatched shapes); regenerate it with train.py "
                           f"--eval --save-predictions")
    return pred


def check_against(pred: Predictions, records: Sequence[dict[str, Any]], source: str) -> None:
    """Refuse predictions that are not of these records: a cfg_id the file lacks, a record whose hash is not the
    one the predictions were written with (another checkpoint, config, or a re-evaluation), or a top-1 count that
    is not the record's acc1 over its number of images."""
    by_id = {r["cfg_id"]: r for r in records}
    fix = "evaluate again (train.py --eval --resume CKPT --save-predictions ...) so both files come from one run"
    for c in pred.cfg_id.tolist():
        rec = by_id.get(c)
        if rec is None:
            raise ResultsError(f"{source}: the predictions hold cfg_id {c}, which the results file lacks; {fix}")
        if pred.meta["record_sha256"][str(c)] != record_sha256(rec):
            raise ResultsError(f"{source}: the predictions of cfg_id {c} were written for another record "
                               f"(checkpoint, config or numbers differ from the results file's line); {fix}")
        hits = int(pred.correct[pred.row(c)].sum())
        n = len(pred.sample_id)
        if rec.get("samples") not in (None, n) or abs(100.0 * hits / max(n, 1) - float(rec["acc1"])) > 1e-6:
            raise ResultsError(f"{source}: cfg_id {c}'s predictions give top-1 {100.0 * hits / max(n, 1):.4f} on "
                               f"{n} images, the results file says {rec['acc1']:.4f} on {rec.get('samples')}; {fix}")


def load_for(results: str | os.PathLike, records: Sequence[dict[str, Any]]) -> Predictions:
    """The predictions beside a results file, checked against its records."""
    path = predictions_path(results)
    pred = read_predictions(path)
    check_against(pred, records, repr(str(path)))
    return pred
