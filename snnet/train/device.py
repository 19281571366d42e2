"""Where a run executes: the device, the process group (torchrun, incl. --max-restarts retries, or one task per
process under Slurm's srun) and precision."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from snnet.utils import slurm
from snnet.utils.distributed import world
from snnet.utils.errors import SNNetError


class DeviceError(SNNetError):
    """A device request this machine cannot meet; the message names the fix."""


#: "0" turns oneDNN (mkldnn) off in this process: convolutions then run as ATen's im2col and the BLAS's gemm. oneDNN
#: sizes its blocks by the CPU's caches, so its kernels sum in another order on another CPU even with their
#: instruction set pinned (ONEDNN_MAX_CPU_ISA); the digits demo sets it to give the same numbers on every x86-64 CPU
ONEDNN_ENV = "SNNET_ONEDNN"


def apply_onednn_switch() -> None:
    """oneDNN off when ONEDNN_ENV is "0" (torch has no variable of its own for it)."""
    if os.environ.get(ONEDNN_ENV) == "0":
        torch.backends.mkldnn.enabled = False


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a DistributedDataParallel wrapper (or the network itself)."""
    return model.module if hasattr(model, "module") else model


_agreed_attempt: int | None = None  # set once per process by agree_on_attempt


def restart_attempt() -> int:
    """How often torchrun has restarted this worker group (0 on the first attempt), the same on every rank once
    `agree_on_attempt` has run; before, this node's TORCHELASTIC_RESTART_COUNT."""
    if _agreed_attempt is not None:
        return _agreed_attempt
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def agree_on_attempt() -> int:
    """The worker group's restart count as every rank on every node sees it.

    TORCHELASTIC_RESTART_COUNT counts only this node's failures: when a worker on another node dies while ours
    still runs (e.g. stuck in a collective), our agent restarts its workers as a membership change without
    counting it, so the new workers see a different count on each node (and looked for different stores: a hang).
    With the agent's store (torchrun's c10d and static rendezvous) each rank counts its starts there instead: every
    restart of a fixed-size worker group starts each global rank once, so the counts agree. Counted once per
    process: later calls return the same number."""
    global _agreed_attempt
    if (_agreed_attempt is None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and world(launched=True)[1] > 1 and not dist.is_initialized()):
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=timedelta(minutes=10))
        _agreed_attempt = store.add(f"snnet/starts/rank{world(launched=True)[0]}", 1) - 1
    return restart_attempt()


def adopt_slurm_env() -> dict[str, str]:
    """Under ``srun`` (one task per GPU, no torchrun): export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
    MASTER_PORT from Slurm's variables (`snnet.utils.slurm.torch_env`), so that everything reading torchrun's
    variables (timm, the logging of rank 0 only, the samplers) sees the same world. Returns what it set; a second
    call sets nothing."""
    found = slurm.torch_env()
    os.environ.update(found)
    return found


def requeued() -> int:
    """How often Slurm has requeued this job (0 outside Slurm): a requeued run continues from its checkpoints."""
    return slurm.restart_count()


def device_from_flag(name: str | None, per_rank: bool = False, here: bool = True) -> torch.device:
    """The one reading of ``--device``: None means cuda when available (with `per_rank`, this process's
    ``cuda:LOCAL_RANK``), else cpu; a name that is no torch device, a device this machine lacks (cuda, mps,
    an index past its count) or ``meta`` is one line.
    `here` False (a dry run, resolved for any machine): the name is parsed, not checked against this machine."""
    if name is None:
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if per_rank else "cuda")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise DeviceError(f"--device {name!r} is not a torch device; use cpu or cuda[:index]") from None
    if device.type == "meta":
        raise DeviceError(f"--device {name}: a meta tensor holds no values to compute with; use --device cpu")
    if not here or device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.mps, torch.xpu: each says if it is usable
    available = getattr(backend, "is_available", lambda: False)
    what = "CUDA" if device.type == "cuda" else device.type
    if not available():
        raise DeviceError(f"--device {name}: {what} is not available here; use --device cpu")
    count = getattr(backend, "device_count", lambda: 1)()
    if device.index is not None and device.index >= count:
        raise DeviceError(f"--device {name}: this machine has {count} {what} device(s); use --device "
                          f"{device.type}:0 to {device.type}:{count - 1}")
    return device


@dataclass(frozen=True)
class Placement:
    """Where this process runs: its device and its place in the process group (timm's init_distributed_device's
    results: train.py's --device, distributed, rank, world_size and local_rank)."""
    device: torch.device
    distributed: bool = False
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def init_distributed(device: str | None, dist_backend: str | None = None, dist_url: str | None = None) -> Placement:
    """timm's init_distributed_device (its keyword form), plus the process group of a torchrun restart (see
    below). Under Slurm's srun the ranks come from Slurm's environment (`adopt_slurm_env`), the master address from
    the job's first host."""
    adopt_slurm_env()
    name = str(device_from_flag(device))
    attempt = agree_on_attempt()
    if attempt > 0 and world(launched=True)[1] > 1 and not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if name.startswith("cuda"):  # before the group: NCCL binds each process to its current device
            name = f"cuda:{local}"
            torch.cuda.set_device(name)
        _init_restarted_group(name, dist_backend, attempt)
        return Placement(torch.device(name), True, dist.get_rank(), dist.get_world_size(), local)
    # imported here: timm takes seconds to import, and the rest of this module (the oneDNN switch) needs none of it
    from timm.utils.distributed import init_distributed_device_so
    found = init_distributed_device_so(device=name, dist_backend=dist_backend, dist_url=dist_url)
    return Placement(torch.device(found["device"]), found["distributed"], found["global_rank"], found["world_size"],
                     found["local_rank"])


def _init_restarted_group(device: str, dist_backend: str | None, attempt: int) -> None:
    """Process group of a torchrun --max-restarts retry, on a store of its own.

    Seen with torch 2.14 on CPU: restarted workers joining through the agent's store could hang in, or fail,
    the gloo rendezvous. Rank 0 hosts a fresh TCPStore on MASTER_PORT + 1 + attempt instead, so each attempt
    starts from an empty store."""
    rank, world_size = world(launched=True)
    port = int(os.environ["MASTER_PORT"]) + 1 + attempt
    store = dist.TCPStore(os.environ["MASTER_ADDR"], port, world_size, is_master=rank == 0,
                          timeout=timedelta(minutes=10))
    backend = dist_backend or ("nccl" if device.startswith("cuda") else "gloo")
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN has bf16 kernels on this CPU (AVX-512 BF16 or AMX); without them bf16 convolutions run
    torch's reference kernels."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def amp_context(device: torch.device, dtype: torch.dtype | None):
    """torch.amp autocast in `dtype`, or nothing when `dtype` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
