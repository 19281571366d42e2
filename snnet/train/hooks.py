"""The hooks of a training run: what a caller adds to `Trainer.fit`'s epochs (`EpochHooks`), and what runs after
every optimizer step (`TrainContext.after_step`): train.py's recovery checkpoint inside an epoch and its stop at an
agreed step under Slurm (`Recovery`), and the fault-injection hooks of the tests (`fault_injection`)."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import torch

from snnet.stitching.model import RoutedNet
from snnet.train.device import requeued, restart_attempt
from snnet.train.engine import TrainContext
from snnet.train.preempt import STOP, Preempted
from snnet.utils.checkpoint import LAST, RECOVERY, CheckpointSaver, training_state
from snnet.utils.distributed import world
from snnet.utils.fileio import write_text_atomic


class EpochHooks:
    """What a caller adds to `Trainer.fit`'s epochs; each method does nothing here. Subclass it and keep the
    state the hooks share as attributes."""

    def start_epoch(self, epoch: int) -> None:
        """Before the epoch's first step."""

    def trained(self, epoch: int) -> None:
        """After the epoch's steps, before BatchNorm statistics are synced and validation."""

    def validate(self, epoch: int, train_metrics: dict) -> tuple[dict, float | None]:
        """(the epoch's metrics, the scheduler's metric or None)."""
        return {}, None

    def end_epoch(self, epoch: int, train_metrics: dict, metrics: dict, lr: float) -> None:
        """After the scheduler step; `lr` is the LR the epoch trained at."""


class Recovery:
    """train.py's after-step hooks around a run's `TrainState` (``ctx.state``): the recovery checkpoint
    ``recovery.pth.tar`` every --recovery-interval steps inside an epoch (`periodic`), and under Slurm
    (`snnet.train.preempt`) the stop at a step every rank agrees on once any rank got SIGUSR1/SIGTERM
    (`check_stop`, then `stop_after` at the epoch's end). `install` puts them into ``ctx.after_step``."""

    def __init__(self, model: RoutedNet, optimizer: torch.optim.Optimizer, ctx: TrainContext, saver: CheckpointSaver,
                 identity: tuple[str, str], every: int, steps_per_epoch: int, out_dir: Path):
        self.model, self.optimizer, self.ctx, self.saver = model, optimizer, ctx, saver
        self.args_json, self.config_text = identity  # what every checkpoint records ("args", "config")
        self.every, self.steps_per_epoch, self.out_dir = every, steps_per_epoch, out_dir
        self.stop_after_epoch = False  # a stop signal came in an epoch's last step: the run stops after the epoch

    def install(self) -> None:
        """The recovery checkpoint first, the stop last (after the caller's hooks: the fault injection)."""
        self.ctx.after_step.insert(0, self.periodic)
        self.ctx.after_step.append(self.check_stop)

    def write(self, global_step: int) -> None:
        """Writes ``recovery.pth.tar`` after an optimizer step inside an epoch (a collective: every rank calls it).
        Every rank contributes what it needs to continue exactly (`TrainState.rank_state`)."""
        state = self.ctx.state
        mine = state.rank_state()
        ranks: list[Any] = [mine]
        if world()[1] > 1:
            ranks = [None] * world()[1]
            torch.distributed.all_gather_object(ranks, mine)
        if world()[0] == 0:
            ema = self.ctx.model_ema.module if self.ctx.model_ema is not None else None
            saved = training_state(self.model, self.optimizer, state.epoch, global_step, self.args_json,
                                   self.config_text, self.ctx.loss_scaler, ema=ema)
            self.saver.save_recovery({**saved, "batch_idx": state.epoch_step, "ranks": ranks})

    def periodic(self, global_step: int) -> None:
        """The recovery checkpoint every --recovery-interval steps (not at an epoch's end, where last.pth.tar is
        written)."""
        if self.every and not global_step % self.every and self.ctx.state.epoch_step != self.steps_per_epoch:
            self.write(global_step)

    def check_stop(self, global_step: int) -> None:
        """Once any rank got a stop signal, every rank stops after this same step. Inside an epoch the recovery
        checkpoint is written and the run ends (`Preempted`); at an epoch's last step the epoch ends as usual
        (validation, last.pth.tar) and `stop_after` ends the run after it."""
        state = self.ctx.state
        if self.stop_after_epoch or not STOP.agreed(self.ctx.settings.device):
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


__all__ = ["EpochHooks", "Recovery", "all_saved", "fault_injection"]
