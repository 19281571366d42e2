"""Slurm, read and asked: a task's rank from Slurm's environment (as timm's init_distributed_device reads it), the
master address from the job's first host, and `sbatch` for job arrays (docs/slurm.md).

`torch_env` maps an ``srun`` task's Slurm variables to torch.distributed's (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT); train.py adopts them before anything reads RANK. `submit` runs ``sbatch --parsable``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence

from snnet.utils.errors import SNNetError


class SlurmError(SNNetError):
    """A Slurm request that cannot be made here (no sbatch, a refused submission); the message names the fix."""


#: exit code of a train.py (or stitch-train) run that stopped early on a Slurm signal after saving where it was
#: (EX_TEMPFAIL: "try again later"); slurm/train.sbatch requeues the job on it
PREEMPTED_EXIT = 75


def in_slurm_task(env: Mapping[str, str] | None = None) -> bool:
    """True in a task ``srun`` started (a job step), not in the batch script itself (which has SLURM_PROCID 0 and
    the job's SLURM_NTASKS too, but no SLURM_STEP_ID) and not under torchrun (which sets RANK itself)."""
    env = os.environ if env is None else env
    return "SLURM_STEP_ID" in env and "SLURM_PROCID" in env and "RANK" not in env


def restart_count(env: Mapping[str, str] | None = None) -> int:
    """How often Slurm has requeued this job (SLURM_RESTART_COUNT; 0 on its first start)."""
    env = os.environ if env is None else env
    return int(env.get("SLURM_RESTART_COUNT", "0") or 0)


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list (``node[03-05,9]`` -> ``node03``), expanded by ``scontrol show
    hostnames`` as timm and submitit do."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        raise SlurmError(f"cannot expand SLURM_JOB_NODELIST {nodelist!r}: no scontrol on PATH; set MASTER_ADDR to "
                         f"the first node's address")
    r = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=60)
    hosts = r.stdout.split()
    if r.returncode != 0 or not hosts:
        raise SlurmError(f"scontrol show hostnames {nodelist!r} failed ({r.stderr.strip() or 'no hosts'}); set "
                         f"MASTER_ADDR to the first node's address")
    return hosts[0]


def master_port(env: Mapping[str, str]) -> int:
    """A port every task of the step derives alike: from the job id and its restart count (a requeued job gets a
    fresh one, so its store never meets the previous attempt's lingering socket), in 20000-29499: below torchrun's
    default 29500 and Linux's ephemeral ports (32768 on)."""
    job = int(env.get("SLURM_JOB_ID", "0") or 0)
    step = int(env.get("SLURM_STEP_ID", "0") or 0) if env.get("SLURM_STEP_ID", "0").isdigit() else 0
    return 20000 + (job * 101 + restart_count(env) * 7 + step) % 9500


def torch_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """torch.distributed's variables for an ``srun`` task ({} elsewhere): RANK = SLURM_PROCID, WORLD_SIZE =
    SLURM_NTASKS, LOCAL_RANK = SLURM_LOCALID, MASTER_ADDR = the step's first host (unless set), MASTER_PORT
    (unless set, see `master_port`)."""
    env = os.environ if env is None else env
    if not in_slurm_task(env):
        return {}
    world = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1"
    out = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": world, "LOCAL_RANK": env.get("SLURM_LOCALID", "0")}
    if int(world) > 1:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if "MASTER_ADDR" not in env:
            if not nodes:
                raise SlurmError("an srun task without SLURM_JOB_NODELIST: set MASTER_ADDR to the first node")
            out["MASTER_ADDR"] = first_host(nodes)
        if "MASTER_PORT" not in env:
            out["MASTER_PORT"] = str(master_port(env))
    return out


def submit(script: str, options: Sequence[str] = (), cwd: str | None = None) -> str:
    """``sbatch --parsable OPTIONS SCRIPT``: the job id (an array's id for ``--array``)."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise SlurmError("sbatch is not on PATH: submit from a Slurm login node (or install slurm-client)")
    r = subprocess.run([sbatch, "--parsable", *options, script], capture_output=True, text=True, cwd=cwd,
                       timeout=120)
    if r.returncode != 0:
        raise SlurmError(f"sbatch {' '.join(options)} {script} was refused: {' '.join(r.stderr.split())[:300]}; fix "
                         f"the sbatch options")
    return r.stdout.strip().split(";")[0]
