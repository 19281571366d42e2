"""Training and evaluation loops, and the stitches_res.txt results file.

The network is anything with ``num_configs``, ``forward(x, cfg_id)``, ``describe(cfg_id)`` and ``params(cfg_id)``:
an `SNNet`, or a `PlainNet` wrapping one timm model (cfg_id 0).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .fileio import write_text_atomic

_logger = logging.getLogger("snnet")
RESULTS_FILE = "stitches_res.txt"


class NonFiniteLoss(RuntimeError):
    pass


def _fault_injection(global_step: int) -> None:
    """Test hook: SNNET_FAULT_KILL_AT_STEP=N kills this process with SIGKILL after optimizer step N (on the rank
    SNNET_FAULT_RANK, default all; only in the first attempt of a torchrun --max-restarts run)."""
    at = os.environ.get("SNNET_FAULT_KILL_AT_STEP")
    if at is None or int(at) != global_step or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    rank = os.environ.get("SNNET_FAULT_RANK")
    if rank is None or rank == os.environ.get("RANK", "0"):
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


class PlainNet(nn.Module):
    """One timm model behind the SN-Net interface (``--model NAME``), as SN-Net's main.py can train one model."""

    def __init__(self, model: nn.Module, name: str):
        super().__init__()
        self.model = model
        self.names = [name]

    num_configs = 1

    def forward(self, x: torch.Tensor, cfg_id: int = 0) -> torch.Tensor:
        return self.model(x)

    def describe(self, cfg_id: int) -> str:
        return self.names[0]

    def params(self, cfg_id: int) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def no_weight_decay(self) -> set[str]:
        nwd = getattr(self.model, "no_weight_decay", None)
        return {f"model.{n}" for n in nwd()} if nwd else set()

    @property
    def pretrained_cfg(self) -> dict:
        return getattr(self.model, "pretrained_cfg", {}) or {}


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def model_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """State dict to checkpoint: a plain model's own keys (usable as an anchor checkpoint), or the SN-Net's."""
    net = unwrap(net)
    return (net.model if isinstance(net, PlainNet) else net).state_dict()


def load_model_state(net: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    from .checkpoint import CheckpointError
    target = unwrap(net)
    target = target.model if isinstance(target, PlainNet) else target
    own = target.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"checkpoint {source!r} does not fit this model ({len(missing)} missing keys e.g. {missing[:2]}, "
            f"{len(unexpected)} unexpected e.g. {unexpected[:2]}, {len(wrong)} of another shape e.g. {wrong[:2]}); "
            f"it was made with another stitch config, model or --num-classes: pass the same ones")
    target.load_state_dict(state, strict=True)


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def amp_context(device: torch.device, enabled: bool, dtype: torch.dtype | None):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Periodic log line with rate and ETA."""

    def __init__(self, what: str, total: int, every: int, unit: str = "img"):
        self.what, self.total, self.every, self.unit = what, total, max(1, every), unit
        self.start = time.perf_counter()
        self.items = 0

    def update(self, step: int, items: int, extra: str = "") -> None:
        self.items += items
        if step % self.every and step != self.total:
            return
        elapsed = time.perf_counter() - self.start
        rate = self.items / max(elapsed, 1e-9)
        eta = elapsed / max(step, 1) * (self.total - step)
        _logger.info(f"{self.what} [{step:>4d}/{self.total}] {extra} {rate:.1f} {self.unit}/s "
                     f"elapsed {_fmt_time(elapsed)} eta {_fmt_time(eta)}")


def _check_finite(loss: torch.Tensor, epoch: int, step: int, cfg_id: int, net: nn.Module) -> None:
    """Stop before a non-finite loss reaches the weights. Under DDP every rank learns of it in the same step (each
    trains its own stitch), so no rank is left waiting in an all-reduce."""
    mine = torch.tensor([0.0 if math.isfinite(loss.item()) else 1.0, float(cfg_id)], device=loss.device)
    if world()[1] > 1:
        flags = [torch.zeros_like(mine) for _ in range(world()[1])]
        dist.all_gather(flags, mine)
    else:
        flags = [mine]
    culprits = [(r, int(f[1])) for r, f in enumerate(flags) if f[0] > 0]
    if culprits:
        rank, cfg = culprits[0]
        raise NonFiniteLoss(f"non-finite loss at epoch {epoch}, step {step} on rank {rank} (stitch cfg_id {cfg}: "
                            f"{unwrap(net).describe(cfg)}); lower --lr or set --clip-grad")


def train_one_epoch(net: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, loss_fn: Callable,
                    sampler: Callable[[int], int], epoch: int, global_step: int, device: torch.device,
                    amp_dtype: torch.dtype | None, loss_scaler=None, lr_scheduler=None, mixup_fn=None,
                    clip_grad: float | None = None, clip_mode: str = "norm", log_interval: int = 50,
                    sched_on_updates: bool = False, prefetcher: bool = True,
                    parameters: Callable[[], Iterable] | None = None) -> tuple[float, int]:
    """One epoch; each step trains the stitch `sampler(global_step)`. Returns (mean loss over ranks, step)."""
    from timm.utils import dispatch_clip_grad
    net.train()
    n_batches = len(loader)
    progress = Progress(f"Train: {epoch}", n_batches, log_interval)
    loss_sum = torch.zeros((), dtype=torch.float64)
    seen = 0
    for i, (x, y) in enumerate(loader, start=1):
        if not prefetcher:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if mixup_fn is not None:
            x, y = mixup_fn(x, y)
        cfg_id = sampler(global_step)
        with amp_context(device, amp_dtype is not None, amp_dtype):
            out = net(x, cfg_id)
            loss = loss_fn(x, out, y)
        _check_finite(loss, epoch, global_step, cfg_id, net)
        optimizer.zero_grad(set_to_none=True)
        if loss_scaler is not None:
            loss_scaler(loss, optimizer, clip_grad=clip_grad, clip_mode=clip_mode,
                        parameters=parameters() if parameters else None)
        else:
            loss.backward()
            if clip_grad is not None:
                dispatch_clip_grad(parameters(), clip_grad, mode=clip_mode)
            optimizer.step()
        global_step += 1
        _fault_injection(global_step)
        if lr_scheduler is not None and sched_on_updates:
            lr_scheduler.step_update(num_updates=global_step)
        loss_sum += loss.detach().double().cpu() * x.shape[0]
        seen += x.shape[0]
        lr = sum(g["lr"] for g in optimizer.param_groups) / len(optimizer.param_groups)
        progress.update(i, x.shape[0], f"loss {loss.item():.4f} (avg {float(loss_sum) / seen:.4f}) lr {lr:.3e}")
    stats = torch.tensor([float(loss_sum), float(seen)], dtype=torch.float64)
    if world()[1] > 1:
        dist.all_reduce(stats)
    return float(stats[0] / max(stats[1], 1)), global_step


def _route_steps(model: nn.Module, cfg_ids: Sequence[int]) -> dict[int, tuple]:
    if isinstance(model, PlainNet):
        return {c: (("plain",),) for c in cfg_ids}
    return {c: model.routes[model.check_cfg_id(c)] for c in cfg_ids}


def _runner(model: nn.Module) -> Callable[[tuple, torch.Tensor], torch.Tensor]:
    if isinstance(model, PlainNet):
        return lambda step, x: model(x)
    return model.run_step


@torch.no_grad()
def evaluate_stitches(net: nn.Module, loader: Iterable, cfg_ids: Sequence[int], device: torch.device,
                      amp_dtype: torch.dtype | None = None, log_interval: int = 50, shared_prefixes: bool = True,
                      stats: dict | None = None) -> "OrderedDict[int, dict[str, float]]":
    """Top-1/top-5 (percent) and mean cross-entropy per stitch, reduced over ranks.

    One pass over the data for all stitches: each batch is decoded once and every route runs on it; with
    `shared_prefixes` the routes are walked as a trie so each distinct prefix is computed once per batch
    (snnet/route_tree.py). ``shared_prefixes=False`` runs each route from the input (for comparison).
    """
    from .route_tree import RouteTree
    net.eval()
    model = unwrap(net)
    rows = {c: i for i, c in enumerate(cfg_ids)}
    counts = torch.zeros(len(cfg_ids), 4, dtype=torch.float64)  # correct1, correct5, loss sum, samples
    routes = _route_steps(model, cfg_ids)
    tree = RouteTree(routes)
    run_step = _runner(model)
    progress = Progress(f"Eval {len(cfg_ids)} stitch(es)", len(loader), log_interval)
    peak = 0
    for i, (x, y) in enumerate(loader, start=1):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)

        def emit(cfg_id: int, logits: torch.Tensor) -> None:
            logits = logits.float()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hit = top.eq(y[:, None])
            row = counts[rows[cfg_id]]
            row[0] += float(hit[:, :1].sum())
            row[1] += float(hit.sum())
            row[2] += float(F.cross_entropy(logits, y, reduction="sum"))
            row[3] += y.shape[0]

        with amp_context(device, amp_dtype is not None, amp_dtype):
            if shared_prefixes:
                peak = max(peak, tree.run(run_step, x, emit, track_bytes=stats is not None))
            else:
                for cfg_id, steps in routes.items():
                    h = x
                    for step in steps:
                        h = run_step(step, h)
                    emit(cfg_id, h)
        progress.update(i, x.shape[0])
    if stats is not None:
        stats["peak_activation_bytes"] = peak
    if world()[1] > 1:
        dist.all_reduce(counts)
    out = OrderedDict()
    for cfg_id, row in rows.items():
        c1, c5, loss, n = counts[row].tolist()
        n = max(n, 1)
        out[cfg_id] = {"acc1": 100.0 * c1 / n, "acc5": 100.0 * c5 / n, "loss": loss / n, "samples": int(n)}
    return out


def default_val_panel(num_configs: int, n_anchors: int, extra: int = 4) -> list[int]:
    """Anchors plus a few evenly spread stitches: validated after every epoch (the full sweep runs at the end)."""
    stitched = list(range(n_anchors, num_configs))
    step = max(1, len(stitched) // max(extra, 1))
    return list(range(n_anchors)) + stitched[step // 2::step][:extra]


# ---------------------------------------------------------------------------------------------------- results file
def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class ResultsError(ValueError):
    pass


class ResultsFile:
    """stitches_res.txt: one JSON object per stitch, written atomically once the pass over the data is done.

    Each record carries the hash of the checkpoint and of the config that produced it. A rerun skips the set of
    completed cfg_ids of the same checkpoint and config; a torn last line (crash mid-write) is dropped and redone;
    records of another checkpoint or config are never mixed into the file.
    """

    def __init__(self, path: str | os.PathLike, checkpoint_hash: str, config_hash: str):
        self.path = Path(path)
        self.checkpoint_hash, self.config_hash = checkpoint_hash, config_hash

    def completed(self) -> dict[int, dict[str, Any]]:
        if not self.path.exists():
            return {}
        lines = self.path.read_text().splitlines(keepends=True)
        records, good = {}, []
        for n, line in enumerate(lines):
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict) or "cfg_id" not in rec:
                    raise ValueError
            except ValueError:
                if n == len(lines) - 1:  # torn last line: drop it, that stitch is evaluated again
                    _logger.warning(f"{self.path}: last line is incomplete; it will be redone")
                    write_text_atomic(self.path, "".join(good))
                    break
                raise ResultsError(f"{str(self.path)!r} line {n + 1} is not a JSON record; move the file away "
                                   f"or pass another --output") from None
            if (rec.get("checkpoint_sha256"), rec.get("config_sha256")) != (self.checkpoint_hash, self.config_hash):
                raise ResultsError(f"{str(self.path)!r} holds results of another checkpoint or config (cfg_id "
                                   f"{rec['cfg_id']}); evaluate into another folder (--output/--experiment) or "
                                   f"move the file away")
            records[int(rec["cfg_id"])] = rec
            good.append(line if line.endswith("\n") else line + "\n")
        return records

    def extend(self, records: Iterable[dict[str, Any]]) -> None:
        """Add records in one atomic write (the old file stays whole until the new one replaces it)."""
        old = self.path.read_text() if self.path.exists() else ""
        new = "".join(json.dumps({**r, "checkpoint_sha256": self.checkpoint_hash,
                                  "config_sha256": self.config_hash}) + "\n" for r in records)
        write_text_atomic(self.path, old + new)
