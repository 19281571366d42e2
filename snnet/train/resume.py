"""Continuing a run: the checkpoint it starts from (`fitting_checkpoint`), the counters, optimizer and scaler it
resumes (`resume_counters`), the steps of an interrupted epoch it skips (`continue_epoch`, into the run's
`TrainState`) and summary.csv's rows (`append_summary`; `truncate_summary` drops the redone ones). The recovery
checkpoint written inside an epoch, the stop at an agreed step under Slurm and the fault-injection hooks of the
tests are after-step hooks (`snnet.train.hooks`)."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import torch

from snnet.stitching.model import PlainNet
from snnet.train.device import unwrap
from snnet.train.engine import TrainState
from snnet.train.options import TrainOptions
from snnet.utils.checkpoint import (
    LAST,
    CheckpointError,
    fit_report,
    image_size_hint,
    json_field,
    load_checkpoint,
)
from snnet.utils.distributed import world
from snnet.utils.fileio import write_text_atomic


def fitting_checkpoint(net: torch.nn.Module, path: str, structure_only: bool = False) -> dict:
    """A checkpoint to start from (--resume, --initial-checkpoint), read once and refused now if it does not fit the
    network (before any image is read). `structure_only` (the preflight, on the meta-device network built with a
    guessed number of classes where the data decides it): keys and shapes read without the weights (`load_checkpoint`
    lazy), the classifiers left out."""
    model = unwrap(net)
    state = load_checkpoint(path, lazy=structure_only)
    own, theirs = model.checkpoint_state(), state["state_dict"]
    if structure_only:
        heads = model.checkpoint_heads()
        own, theirs = ({k: v for k, v in d.items() if k not in heads} for d in (own, theirs))
    report = fit_report(own, theirs)
    if report:
        hint = image_size_hint(model, theirs) or _network_kind_hint(model, state)  # name the right flag
        raise CheckpointError(f"checkpoint {path!r} does not fit this model ({hint + '; ' if hint else ''}{report}); "
                              f"it was made with another stitch config, model, image size or --num-classes: pass "
                              f"the same ones")
    return state


def _network_kind_hint(model: torch.nn.Module, state: dict) -> str:
    """'' or what a checkpoint of the other kind of network is: an SN-Net's (it recorded a stitch config) given to a
    plain --model run, or a plain model's given to a --stitch_config run (by its recorded network, else its keys)."""
    ident = json_field(state, "config")
    recorded = ident.get("stitch_config") if isinstance(ident, dict) else None
    anchors = ident.get("anchors") if isinstance(ident, dict) else None
    keys = state["state_dict"]
    stitched = recorded is not None or any(k.startswith(("anchors.", "stitch_layers.")) for k in keys)
    plain = isinstance(model, PlainNet)
    if plain and stitched:
        return "it is an SN-Net's checkpoint: pass the --stitch_config it was trained with instead of --model"
    if not plain and not stitched:
        name = f" ({anchors[0]!r})" if isinstance(anchors, list) and len(anchors) == 1 and \
            isinstance(anchors[0], str) else ""
        return (f"it is a plain model's checkpoint{name}, not an SN-Net's: resume it with --model, or name it as an "
                f"anchor's \"checkpoint\" in the stitch config")
    return ""


def resume_counters(train: TrainOptions, resume_state: dict | None, optimizer: torch.optim.Optimizer,
                    loss_scaler: Any) -> tuple[int, int]:
    """(start epoch, global step); the optimizer and scaler states unless --no-resume-opt (timm's semantics)."""
    start_epoch, global_step = 0, 0
    if resume_state is not None:  # a recovery checkpoint continues inside its epoch
        start_epoch = int(resume_state.get("epoch", -1)) + (0 if "batch_idx" in resume_state else 1)
        global_step = int(resume_state.get("global_step", 0))
        if not train.no_resume_opt and "optimizer" in resume_state:
            optimizer.load_state_dict(resume_state["optimizer"])
            if loss_scaler is not None and resume_state.get("amp_scaler"):
                loss_scaler.load_state_dict(resume_state["amp_scaler"])
    if train.start_epoch is not None:
        start_epoch = train.start_epoch
    return start_epoch, global_step


def continue_epoch(state: TrainState, resume_state: dict | None, accum: int = 1) -> None:
    """From a recovery checkpoint: skip the steps its epoch already trained and replay this rank's RNG."""
    if resume_state is None or "batch_idx" not in resume_state:
        return
    rank, world_size = world()
    ranks = resume_state["ranks"]
    if len(ranks) != world_size:
        raise CheckpointError(f"recovery checkpoint of {len(ranks)} process(es) cannot continue on {world_size}; "
                              f"resume it with {len(ranks)} processes, or resume from {LAST} instead")
    saved = (json_field(resume_state, "args") or {}).get("grad_accum_steps", 1)
    if saved != accum:
        raise CheckpointError(f"recovery checkpoint made with --grad-accum-steps {saved} cannot continue its epoch "
                              f"with {accum}; resume it with --grad-accum-steps {saved}, or resume from {LAST}")
    state.continue_from(int(resume_state["batch_idx"]), ranks[rank])


def append_summary(path: Path, epoch: int, train_metrics: dict, eval_metrics: dict, lr: float | None) -> None:
    """summary.csv's row of an epoch, as timm's update_summary makes it (epoch, train_*, eval_*, lr; rows end with
    \r\n), in a file whose header is every column its rows have had. With --val-interval N an epoch without
    validation has no eval_* cells, and timm's writer took the header from the first row (epoch 0, unvalidated),
    leaving the later rows longer than their header. A row that brings new columns rewrites the file (atomically)
    under the wider header, the earlier rows' new cells empty; a row without some columns leaves them empty."""
    row: dict[str, Any] = {"epoch": epoch, **{f"train_{k}": v for k, v in train_metrics.items()},
                           **{f"eval_{k}": v for k, v in eval_metrics.items()}}
    if lr is not None:
        row["lr"] = lr
    header: list[str] = []
    rows: list[dict[str, str]] = []
    if path.exists() and path.stat().st_size:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            if any(k not in header for k in row):
                rows = list(reader)
    if header and all(k in header for k in row):
        with path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=header, restval="").writerow(row)
        return
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(row) + [k for k in header if k not in row], restval="")
    writer.writeheader()
    writer.writerows(rows)
    writer.writerow(row)
    write_text_atomic(path, text.getvalue(), newline="")


def truncate_summary(path: Path, start_epoch: int) -> None:
    """A resumed run redoes epochs >= start_epoch: drop their rows (written before the kill) from summary.csv. The
    kept rows stay byte for byte as written (timm's csv writer ends rows with \\r\\n): read and written with no
    newline translation."""
    if not path.exists():
        return
    with path.open(newline="") as f:
        lines = f.read().splitlines(keepends=True)
    keep = lines[:1] + [l for l in lines[1:] if l.split(",", 1)[0].isdigit() and int(l.split(",", 1)[0]) < start_epoch]
    write_text_atomic(path, "".join(keep), newline="")
