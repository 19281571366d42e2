"""Measured latency of every stitch on the current device, added to the results records.

Each stitch runs ``net(x, cfg_id)`` (the same kernels as its exported network) on random images of the given batch
sizes: `warmup` untimed calls, then `repeats` timed calls (CUDA synchronised after each, stitches taken
round-robin); the median is reported in milliseconds per batch. Records gain ``latency_ms_b<batch>`` for each
batch size, ``latency_device`` (e.g. ``cpu: AMD EPYC, 2 threads``) and ``latency_img_size``, so
``snnet pareto --by latency`` and ``snnet select --max-latency-ms`` work. A results file is rewritten only when it
is this SN-Net's, of this checkpoint, at this image size (`check_results`): its routes match; records stamped with a
``checkpoint_sha256`` (our evaluator's) carry this checkpoint's, and their FLOPs are this SN-Net's at the image size
measured here (the evaluator counts them at the size it evaluated at); latencies already there were measured at this
size (``latency_img_size``). Otherwise one file would pair accuracies of one network with latencies of another.
SN-Net's own files carry no hash: their routes (cfg_ids) are checked only.
The file is read and rewritten by `snnet.results.records` (the one reader and writer).
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from snnet.results.pareto import human
from snnet.results.records import (
    ResultsError,
    check_checkpoint_sha,
    check_routes,
    file_sha256,
    is_number,
    read_results,
    update_results,
)
from snnet.stitching.cost import cost_table
from snnet.utils.progress import PROGRESS_SECONDS, Progress

if TYPE_CHECKING:
    from snnet.stitching.model import SNNet


def device_name(device: torch.device) -> str:
    """What the numbers were measured on: the GPU's name, or the CPU's model and torch's thread count."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if not name:
        name = platform.processor() or platform.machine()
    threads = torch.get_num_threads()
    return f"{device.type}: {name}, {threads} thread{'s' if threads > 1 else ''}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[torch.Tensor], Any], x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    fn(x)
    _sync(x.device)
    return time.perf_counter() - t0


@torch.inference_mode()
def time_calls(fns: dict[Any, Callable[[torch.Tensor], Any]], x: torch.Tensor, warmup: int = 5,
               repeats: int = 20, progress: Progress | None = None) -> dict[Any, float]:
    """Median wall time in ms of each ``fn(x)``, after `warmup` untimed calls of each.

    The timed calls go round-robin (every fn once per round) rather than fn by fn, so a slow spell of a shared
    machine (another job, frequency changes) hits every stitch alike instead of a few of them. `progress` advances
    by one step per call.
    """
    tick = progress.advance if progress is not None else (lambda *a: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn(x)
            tick(x.shape[0])
    _sync(x.device)
    times: dict[Any, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(_timed(fn, x))
            tick(x.shape[0])
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def measure_latency(net: SNNet, cfg_ids: Sequence[int], batches: Sequence[int] = (1, 32),
                    img_size: tuple[int, int] = (224, 224), in_chans: int = 3, warmup: int = 5, repeats: int = 20,
                    device: torch.device | str = "cpu") -> dict[int, dict[str, float]]:
    """``{cfg_id: {"latency_ms_b<batch>": median ms}}`` for every stitch and batch size."""
    device = torch.device(device)
    net.eval().to(device)
    out: dict[int, dict[str, float]] = {c: {} for c in cfg_ids}
    for b in batches:
        x = torch.randn(b, in_chans, *img_size, device=device)
        fns = {c: (lambda t, c=c: net(t, c)) for c in cfg_ids}
        progress = Progress(f"Latency at batch {b}: calls", len(fns) * (warmup + repeats), seconds=PROGRESS_SECONDS,
                            per_phase=(len(fns), "stitches"))
        for c, ms in time_calls(fns, x, warmup, repeats, progress).items():
            out[c][f"latency_ms_b{b}"] = ms
    return out


def _size_text(size: Any) -> str:
    if isinstance(size, int) and not isinstance(size, bool):
        size = [size, size]
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) for s in size):
        return f"{size[0]}x{size[1]}"
    return repr(size)


def results_cfg_ids(net: SNNet, path: str | os.PathLike, checkpoint: str | os.PathLike | None = None,
                    img_size: tuple[int, int] | None = None, in_chans: int = 3) -> list[int]:
    """cfg_ids of a results file, refused when its routes are not this SN-Net's; with `checkpoint` and `img_size`
    also when it is another checkpoint's or of another image size (see the module docstring)."""
    records = read_results(path)
    source = f"results file {str(path)!r}"
    check_routes(net, records, source)
    if checkpoint is not None:
        digest = file_sha256(checkpoint)
        check_checkpoint_sha(records, digest, f"checkpoint {str(checkpoint)!r}", source)
    if img_size is None:
        return [r["cfg_id"] for r in records]
    here = _size_text(list(img_size))
    for r in records:
        if "latency_img_size" in r and _size_text(r["latency_img_size"]) != here:
            raise ResultsError(f"{source} holds latencies measured at {_size_text(r['latency_img_size'])} (cfg_id "
                               f"{r['cfg_id']}), this run measures at {here}; pass --img-size of those, or measure "
                               f"into a fresh copy of the evaluation's file")
    stamped = [r for r in records if checkpoint is not None and r.get("checkpoint_sha256") == digest and
               is_number(r.get("flops"))]
    if stamped:
        table = cost_table(net, (int(img_size[0]), int(img_size[1])), in_chans)
        for r in stamped:
            ours = table.route_flops(net.routes[r["cfg_id"]])
            if abs(ours - r["flops"]) > 1e-6 * max(abs(ours), 1.0):
                raise ResultsError(f"{source} was evaluated at another image size than {here}: its cfg_id "
                                   f"{r['cfg_id']} has {human(r['flops'])} FLOPs, this SN-Net at {here} has "
                                   f"{human(ours)} FLOPs; pass --img-size of the evaluation")
    return [r["cfg_id"] for r in records]


def add_latency(path: str | os.PathLike, table: dict[int, dict[str, float]], extra: dict[str, Any]) -> int:
    """Add the measured keys (and `extra`, e.g. the device) to the records of `path`, in one atomic rewrite.

    Lines keep their order and keys; a torn last line (an interrupted evaluation) is dropped. Returns the number
    of records updated.
    """
    def add(rec: dict[str, Any]) -> bool:
        if rec["cfg_id"] not in table:
            return False
        rec.update(table[rec["cfg_id"]])
        rec.update(extra)
        return True
    return update_results(path, add)
