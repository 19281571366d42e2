"""Continuing a run: the checkpoint it starts from (`fitting_checkpoint`), the counters, optimizer and scaler it
resumes (`resume_counters`), the steps of an interrupted epoch it skips (`continue_epoch`), the recovery checkpoint
written inside an epoch (`recovery_writer`, `recovery_hook`), the stop at an agreed step under Slurm (`stop_hook`),
summary.csv's redone rows (`truncate_summary`) and the fault-injection hooks of the tests (`fault_injection`)."""
from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from snnet.core.checkpoint import (
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
from snnet.core.distributed import world
from snnet.core.fileio import write_text_atomic
from snnet.core.model import PlainNet, RoutedNet
from snnet.train.device import requeued, restart_attempt, unwrap
from snnet.train.engine import TrainContext
from snnet.train.options import TrainOptions
from snnet.train.preempt import STOP, Preempted


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


def continue_epoch(ctx: TrainContext, resume_state: dict | None, accum: int = 1) -> None:
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
    ctx.skip = int(resume_state["batch_idx"])
    ctx.restore = [ranks[rank]["rng_prev"], ranks[rank]["rng"]]
    ctx.epoch_loss = [float(v) for v in ranks[rank]["epoch_loss"]]


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


def recovery_writer(model: RoutedNet, optimizer: torch.optim.Optimizer, ctx: TrainContext, saver: CheckpointSaver,
                    args_json: str, config_text: str, primary: bool) -> Callable[[int], None]:
    """Writes ``recovery.pth.tar`` after an optimizer step inside an epoch (a collective: every rank calls it).
    Every rank contributes what it needs to continue exactly: its RNG states after the last two steps and its share
    of the epoch's loss."""
    def write(global_step: int) -> None:
        rng = list(ctx.rng_after)
        mine = {"rng": rng[-1], "rng_prev": rng[0] if len(rng) == 2 else None, "epoch_loss": list(ctx.epoch_loss)}
        ranks: list[Any] = [mine]
        if world()[1] > 1:
            ranks = [None] * world()[1]
            torch.distributed.all_gather_object(ranks, mine)
        if primary:
            ema = ctx.model_ema.module if ctx.model_ema is not None else None
            state = training_state(model, optimizer, ctx.epoch, global_step, args_json, config_text,
                                   ctx.loss_scaler, ema=ema)
            saver.save_recovery({**state, "batch_idx": ctx.epoch_step, "ranks": ranks})
    return write


def recovery_hook(write: Callable[[int], None], ctx: TrainContext, every: int,
                  steps_per_epoch: int) -> Callable[[int], None]:
    """After-step hook writing the recovery checkpoint every --recovery-interval steps (not at an epoch's end, where
    last.pth.tar is written)."""
    def save(global_step: int) -> None:
        if every and not global_step % every and ctx.epoch_step != steps_per_epoch:
            write(global_step)
    return save


def stop_hook(write: Callable[[int], None], ctx: TrainContext, device: torch.device, out_dir: Path,
              steps_per_epoch: int) -> Callable[[int], None]:
    """After-step hook of a run under Slurm (`snnet.train.preempt`): once any rank got SIGUSR1/SIGTERM, every rank
    stops after this same step. Inside an epoch the recovery checkpoint is written and the run ends (`Preempted`);
    at an epoch's last step the epoch ends as usual (validation, last.pth.tar) and `fit` stops after it."""
    def check(global_step: int) -> None:
        if ctx.stop_after_epoch or not STOP.agreed(device):
            return
        if ctx.epoch_step == steps_per_epoch:
            ctx.stop_after_epoch = True
            return
        write(global_step)
        all_saved()
        raise Preempted(f"{STOP.name()} after step {global_step} (epoch {ctx.epoch}, step {ctx.epoch_step} of "
                        f"{steps_per_epoch}): {out_dir / RECOVERY} written; --auto-resume (or a requeued Slurm "
                        f"job) continues there")
    return check


def all_saved() -> None:
    """Before a preempted run exits: every rank waits for rank 0's checkpoint (srun --kill-on-bad-exit ends the
    other tasks as soon as one exits with a non-zero code)."""
    if world()[1] > 1:
        torch.distributed.barrier()


def fault_injection(global_step: int) -> None:
    """Test hooks, only in the first attempt of a torchrun --max-restarts run or a Slurm job:
    SNNET_FAULT_KILL_AT_STEP=N kills this process with SIGKILL after optimizer step N (on the rank SNNET_FAULT_RANK,
    default all); SNNET_FAULT_WAIT_AT_STEP=N makes every rank write SNNET_FAULT_WAIT_FILE.<rank> after step N and
    wait there (at most 5 minutes) until it receives a stop signal (tests/test_slurm.py preempts it there)."""
    if restart_attempt() != 0 or requeued() != 0:
        return
    wait_at = os.environ.get("SNNET_FAULT_WAIT_AT_STEP")
    if wait_at is not None and int(wait_at) == global_step:
        write_text_atomic(f"{os.environ['SNNET_FAULT_WAIT_FILE']}.{world(launched=True)[0]}", f"{global_step}\n")
        end = time.monotonic() + 300
        while STOP.signum is None and time.monotonic() < end:
            time.sleep(0.05)
    at = os.environ.get("SNNET_FAULT_KILL_AT_STEP")
    if at is None or int(at) != global_step:
        return
    rank = os.environ.get("SNNET_FAULT_RANK")
    if rank is None or int(rank) == world(launched=True)[0]:
        os.kill(os.getpid(), signal.SIGKILL)
