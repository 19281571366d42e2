"""Faults the tests inject into train.py runs, through the trainer's own after-step hooks: asked for by environment
variables that only the tests set, in every process of a run (a forked test child, a torchrun rank, a Slurm task).

SNNET_FAULT_KILL_AT_STEP=N kills the process with SIGKILL after optimizer step N (on the rank SNNET_FAULT_RANK,
default every rank); SNNET_FAULT_WAIT_AT_STEP=N makes every rank write "N <its pid>" to SNNET_FAULT_WAIT_FILE.<rank>
after step N and wait there (at most 5 minutes) until it receives a stop signal (tests/test_slurm.py preempts it
there) or is killed (tests/test_multinode.py), once: not where that file exists already (a worker that torchrun
restarts as a membership change sees attempt 0 again). Both act only in the first attempt of a torchrun
--max-restarts run or a Slurm job. The hook runs after the recovery checkpoint and
before the stop check, as a fault between two steps would."""
from __future__ import annotations

import os
import signal
import time

ASKED = ("SNNET_FAULT_KILL_AT_STEP", "SNNET_FAULT_WAIT_AT_STEP")


def asked() -> bool:
    return any(k in os.environ for k in ASKED)


def fault(global_step: int) -> None:
    from snnet.train.device import requeued, restart_attempt
    from snnet.train.preempt import STOP
    from snnet.utils.distributed import world
    from snnet.utils.fileio import write_text_atomic
    if restart_attempt() != 0 or requeued() != 0:
        return
    wait_at = os.environ.get("SNNET_FAULT_WAIT_AT_STEP")
    if wait_at is not None and int(wait_at) == global_step:
        path = f"{os.environ['SNNET_FAULT_WAIT_FILE']}.{world(launched=True)[0]}"
        if not os.path.exists(path):  # once per rank
            write_text_atomic(path, f"{global_step} {os.getpid()}\n")
            end = time.monotonic() + 300
            while STOP.signum is None and time.monotonic() < end:
                time.sleep(0.05)
    at = os.environ.get("SNNET_FAULT_KILL_AT_STEP")
    if at is None or int(at) != global_step:
        return
    rank = os.environ.get("SNNET_FAULT_RANK")
    if rank is None or int(rank) == world(launched=True)[0]:
        os.kill(os.getpid(), signal.SIGKILL)


def patch(resume_module) -> None:
    """`Recovery.install` of `resume_module` (snnet.train.resume) also puts `fault` before the stop check."""
    recovery = resume_module.Recovery
    if getattr(recovery.install, "faults", False):
        return
    original = recovery.install

    def install(self) -> None:
        original(self)
        self.trainer.after_step.insert(len(self.trainer.after_step) - 1, fault)
    install.faults = True
    recovery.install = install


def apply_if_asked() -> None:
    """In a process that has imported the library already (a forked test child or rank)."""
    if asked():
        import snnet.train.resume
        patch(snnet.train.resume)
