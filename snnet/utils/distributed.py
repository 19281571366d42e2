"""Collectives on the device their backend reduces: nccl takes CUDA tensors only (a CPU tensor raises "No backend
type associated with device type cpu"), gloo takes CPU tensors. Statistics kept on the CPU (evaluation counts, the
epoch's loss) or on the GPU (least-squares statistics) are summed through `all_reduce_sum`, whatever the backend."""
from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def _group():
    """torch.distributed when a process group is set up, else None. torch is not imported for this: a process that
    never imported it has no group, so `world` stays cheap for the `snnet` command line."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask: a container's or Slurm's share), else os.cpu_count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def world(launched: bool = False) -> tuple[int, int]:
    """(rank, world size) of this process in its process group; (0, 1) outside one, so collectives are skipped.
    `launched`: outside a group, the launcher's (torchrun's, or Slurm's once adopted: RANK, WORLD_SIZE), for what
    runs before the group is set up or without one (train.py's dry run and output lock, stitch-train's processes).
    The one place a rank is read."""
    dist = _group()
    if dist is not None:
        return dist.get_rank(), dist.get_world_size()
    if launched:
        return int(os.environ.get("RANK", "0") or 0), int(os.environ.get("WORLD_SIZE", "1") or 1)
    return 0, 1


REFUSAL_DIR = "SNNET_REFUSAL_DIR"


def say_refusal(line: str) -> None:
    """A user error's one line, said once per launch. Under `snnet.train.launch` (which sets SNNET_REFUSAL_DIR) each
    rank writes its line to that folder and the launcher prints the line of the first rank to fail (a line only rank
    0 prints is lost when another rank fails first and torchrun stops rank 0 before it prints). Elsewhere (torchrun
    itself, one process) rank 0 prints it."""
    rank = world(launched=True)[0]
    folder = os.environ.get(REFUSAL_DIR)
    if folder and os.path.isdir(folder):
        from snnet.utils.fileio import write_text_atomic
        try:
            write_text_atomic(os.path.join(folder, f"{rank}.txt"), line + "\n")  # never half a line
            return
        except OSError:
            pass  # the folder is gone: say it here
    if rank == 0:
        print(line, file=sys.stderr)


def collective_device() -> torch.device:
    """Where a tensor must live for this process group's collectives: the current CUDA device under nccl, else CPU."""
    import torch
    dist = _group()
    if dist is not None and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over the ranks (in place when it already lives on the collective's device), on `t`'s own device."""
    import torch.distributed as dist
    device = collective_device()
    if t.device == device:
        dist.all_reduce(t)
        return t
    moved = t.to(device)
    dist.all_reduce(moved)
    return moved.to(t.device)


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of `t` (the same columns, any number of rows per rank), concatenated in rank order, on the
    CPU: the ranks' shares of per-image data (their counts differ by up to one batch)."""
    import torch
    import torch.distributed as dist
    device = collective_device()
    n = torch.tensor([t.shape[0]], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    most = int(max(s.item() for s in sizes))
    padded = torch.zeros((most, *t.shape[1:]), dtype=t.dtype, device=device)
    padded[:t.shape[0]] = t.to(device)
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:int(s.item())].cpu() for p, s in zip(parts, sizes)])


__all__ = ["all_gather_rows", "all_reduce_sum", "collective_device", "world"]
