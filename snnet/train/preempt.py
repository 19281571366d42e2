"""Stopping a run early on a scheduler's signal, at a step every rank agrees on (docs/slurm.md).

Under Slurm (SLURM_JOB_ID set) train.py catches SIGUSR1 (the job's warning signal before its time limit, forwarded by
slurm/train.sbatch) and SIGTERM (preemption, ``scontrol requeue``, ``scancel``): the handler only notes the signal.
After each optimizer step the ranks agree (one all-reduce of a flag) whether any of them got one; if so, every rank
stops after that same step, rank 0 writes the recovery checkpoint (the mechanism of --recovery-interval, so the
requeued job's --auto-resume continues bit-identically) and the run exits with `PREEMPTED_EXIT`.

The handlers are installed when the process starts (train.py's first lines, before torch is imported: this module
needs no torch until `agreed`), so a signal during start-up (imports, checks, data, network, LS init) is noted too:
the run stops after its first step, as it would later.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from typing import TYPE_CHECKING

from snnet.utils.slurm import PREEMPTED_EXIT

if TYPE_CHECKING:
    import torch

_logger = logging.getLogger("snnet")

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preempted(Exception):
    """The run stopped on a scheduler's signal after saving where it was; it continues with --auto-resume."""
    exit_code = PREEMPTED_EXIT


class StopRequest:
    """The signal a process received (None before one); `agreed` asks every rank."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.installed = False

    def install(self) -> bool:
        """Catch SIGUSR1 and SIGTERM under Slurm (not elsewhere: torchrun's agent ends its workers with SIGTERM when a
        peer dies, and they must then go at once). True when installed."""
        if "SLURM_JOB_ID" not in os.environ or threading.current_thread() is not threading.main_thread():
            return False
        for sig in SIGNALS:
            signal.signal(sig, self._note)
        self.installed = True
        return True

    def _note(self, signum: int, frame) -> None:
        self.signum = signum  # nothing else in a handler: the training loop acts at the next step's end

    def agreed(self, device: torch.device) -> bool:
        """True on every rank when any rank has received a signal (one all-reduce of a flag under DDP)."""
        if not self.installed:
            return False
        import torch
        import torch.distributed as dist

        from snnet.utils.distributed import world
        flag = torch.tensor([0.0 if self.signum is None else 1.0], device=device)
        if world()[1] > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "a peer's signal"


STOP = StopRequest()
