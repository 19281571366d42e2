"""Continuing a run: where training stands (`TrainState`), the recovery checkpoint written inside an epoch and the
stop at an agreed step under Slurm (`Recovery`, after-step hooks of the trainer), the checkpoint a run starts from
(`fitting_checkpoint`), the counters, optimizer and scaler it resumes (`resume_counters`), the steps of an
interrupted epoch it skips (`continue_epoch`) and summary.csv's rows (`append_summary`; `truncate_summary` drops the
redone ones)."""
from __future__ import annotations

import csv
import io
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from snnet.stitching.model import PlainNet
from snnet.train.device import unwrap
from snnet.train.options import TrainOptions
from snnet.train.preempt import STOP, Preempted
from snnet.utils.checkpoint import (
    LAST,
    RECOVERY,
    CheckpointError,
    CheckpointSaver,
    fit_report,
    image_size_hint,
    json_field,
    load_checkpoint,
    training_state,
)
from snnet.utils.distributed import world
from snnet.utils.fileio import write_text_atomic


@dataclass
class TrainState:
    """Where training stands: what a recovery checkpoint saves and a resumed run restores (`rank_state`,
    `continue_from`; the epoch checkpoints save `epoch` and `global_step`). With --grad-accum-steps N a step is N
    micro-batches: global_step, epoch_step and skip count optimizer steps."""
    global_step: int = 0                          # optimizer steps taken so far (drives the sampler)
    epoch: int = 0
    epoch_step: int = 0                           # optimizer steps of this epoch so far
    # this epoch's loss sum and samples so far, and the RNG states at the end of the last two batches (a prefetching
    # loader prepares batch i+1 right after batch i-1)
    epoch_loss: list[float] = field(default_factory=lambda: [0.0, 0.0])
    rng_after: deque = field(default_factory=lambda: deque(maxlen=2))
    # losses not read back yet, (loss tensor, samples, epoch, global_step, cfg_id) in order (`Trainer.settle_losses`),
    # and the latest read-back step's loss
    pending: list = field(default_factory=list)
    last_loss: float = float("nan")
    # resuming from a recovery checkpoint: optimizer steps of this epoch already trained, and the RNG states to
    # restore after the last two batches of step skip (None where there is none)
    skip: int = 0
    restore: list = field(default_factory=lambda: [None, None])

    def rank_state(self) -> dict[str, Any]:
        """What this rank writes into a recovery checkpoint ("ranks"): its RNG states after the last two steps and
        its share of the epoch's loss."""
        rng = list(self.rng_after)
        return {"rng": rng[-1], "rng_prev": rng[0] if len(rng) == 2 else None, "epoch_loss": list(self.epoch_loss)}

    def continue_from(self, batch_idx: int, saved: dict[str, Any]) -> None:
        """Continue an epoch a recovery checkpoint interrupted after `batch_idx` steps, from this rank's
        `rank_state` there."""
        self.skip = int(batch_idx)
        self.restore = [saved["rng_prev"], saved["rng"]]
        self.epoch_loss = [float(v) for v in saved["epoch_loss"]]



class Recovery:
    """train.py's after-step hooks around a trainer's `TrainState`: the recovery checkpoint ``recovery.pth.tar``
    every --recovery-interval steps inside an epoch (`periodic`), and under Slurm (`snnet.train.preempt`) the stop
    at a step every rank agrees on once any rank got SIGUSR1/SIGTERM (`check_stop`, then `stop_after` at the
    epoch's end). `install` puts them into the trainer's ``after_step``: the recovery checkpoint first, the stop
    last."""

    def __init__(self, trainer: Any, saver: CheckpointSaver, identity: tuple[str, str], every: int, out_dir: Path):
        self.trainer, self.saver = trainer, saver  # a `snnet.train.trainer.Trainer`
        self.args_json, self.config_text = identity  # what every checkpoint records ("args", "config")
        self.every, self.steps_per_epoch, self.out_dir = every, trainer.steps_per_epoch, out_dir
        self.stop_after_epoch = False  # a stop signal came in an epoch's last step: the run stops after the epoch

    def install(self) -> None:
        self.trainer.after_step.insert(0, self.periodic)
        self.trainer.after_step.append(self.check_stop)

    def write(self, global_step: int) -> None:
        """Writes ``recovery.pth.tar`` after an optimizer step inside an epoch (a collective: every rank calls it).
        Every rank contributes what it needs to continue exactly (`TrainState.rank_state`)."""
        trainer = self.trainer
        state = trainer.state
        trainer.settle_losses()
        mine = state.rank_state()
        ranks: list[Any] = [mine]
        if world()[1] > 1:
            ranks = [None] * world()[1]
            torch.distributed.all_gather_object(ranks, mine)
        if world()[0] == 0:
            saved = training_state(trainer.model, trainer.optimizer, state.epoch, global_step, self.args_json,
                                   self.config_text, trainer.loss_scaler, ema=trainer.ema)
            self.saver.save_recovery({**saved, "batch_idx": state.epoch_step, "ranks": ranks})

    def periodic(self, global_step: int) -> None:
        """The recovery checkpoint every --recovery-interval steps (not at an epoch's end, where last.pth.tar is
        written)."""
        if self.every and not global_step % self.every and self.trainer.state.epoch_step != self.steps_per_epoch:
            self.write(global_step)

    def check_stop(self, global_step: int) -> None:
        """Once any rank got a stop signal, every rank stops after this same step. Inside an epoch the recovery
        checkpoint is written and the run ends (`Preempted`); at an epoch's last step the epoch ends as usual
        (validation, last.pth.tar) and `stop_after` ends the run after it."""
        state = self.trainer.state
        if self.stop_after_epoch or not STOP.agreed(self.trainer.device):
            return
        if state.epoch_step == self.steps_per_epoch:
            self.stop_after_epoch = True
            return
        self.write(global_step)
        all_saved()
        raise Preempted(f"{STOP.name()} after step {global_step} (epoch {state.epoch}, step {state.epoch_step} of "
                        f"{self.steps_per_epoch}): {self.out_dir / RECOVERY} written; --auto-resume (or a requeued "
                        f"Slurm job) continues there")

    def stop_after(self, epoch: int, epochs: range) -> None:
        """At the end of an epoch (its last.pth.tar written): the run stops here when a signal came in its last
        step and epochs are left."""
        if self.stop_after_epoch and epoch + 1 < epochs.stop:
            all_saved()
            raise Preempted(f"{STOP.name()} in the last step of epoch {epoch}: {self.out_dir / LAST} written; "
                            f"--auto-resume (or a requeued Slurm job) continues with epoch {epoch + 1}")


def all_saved() -> None:
    """Before a preempted run exits: every rank waits for rank 0's checkpoint (srun --kill-on-bad-exit ends the
    other tasks as soon as one exits with a non-zero code)."""
    if world()[1] > 1:
        torch.distributed.barrier()


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
