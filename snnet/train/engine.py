"""The loops: train one epoch, evaluate stitches. Nothing else lives here.

The network is a `stitching.model.RoutedNet` (an `SNNet`, or a `PlainNet` holding one timm model): the loops only use
``forward(x, cfg_id)``, ``routes``, ``run_step`` and ``describe``, so they treat both alike. As in timm and DeiT,
a loop returns a metrics dict; what a training run builds once (sampler, scaler, scheduler, mixup, the after-step
hooks) travels in one `TrainContext`, with the loop's frozen settings (`LoopSettings`: device, precision, accumulation,
clipping, autocast of the loss, logging) and where training stands (`TrainState`: the steps taken, this epoch's loss
and RNG snapshots, what a recovery checkpoint holds), so a new option adds a field, not a parameter to every call
(`snnet.train.trainer` builds them from the typed options).
"""
from __future__ import annotations

import contextlib
import math
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.utils import dispatch_clip_grad
from torch import nn

from snnet.stitching.route_tree import RouteTree
from snnet.train.device import amp_context, unwrap
from snnet.train.sampler import rng_state, set_rng_state
from snnet.utils.distributed import all_gather_rows, all_reduce_sum, world
from snnet.utils.errors import SNNetError
from snnet.utils.progress import Progress


class Batches(Protocol):
    """What the loops read: batches with a length (a DataLoader, or a list of (images, labels) pairs)."""

    def __iter__(self) -> Iterator[Any]: ...

    def __len__(self) -> int: ...


class NonFiniteLoss(SNNetError):
    """The loss became NaN or infinite: the run stops (exit code 3); what was written before it is kept (the last
    good checkpoint; a sweep's finished runs)."""
    exit_code = 3


@dataclass(frozen=True)
class LoopSettings:
    """How the training loop runs, fixed for the whole run (train.py's flags; defaults theirs)."""
    device: torch.device
    amp_dtype: torch.dtype | None = None
    accum_steps: int = 1                          # --grad-accum-steps: micro-batches per optimizer step
    clip_grad: float | None = None                # --clip-grad, --clip-mode
    clip_mode: str = "norm"
    amp_loss: bool = True                         # autocast covers the loss too (off: --no-amp-loss)
    move_batches: bool = False                    # --no-prefetcher: the loop moves each batch to the device
    sched_on_updates: bool = False                # --sched-on-updates: the scheduler steps after every update
    log_interval: int = 50
    snapshot_rng: bool = False                    # snapshot the RNG after each batch (recovery checkpoints need it)


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


@dataclass
class TrainContext:
    """What a training run built once and every epoch uses, with the loop's settings and the training state."""
    sampler: Callable[[int], int]                 # global step -> cfg_id this process trains
    settings: LoopSettings
    state: TrainState = field(default_factory=TrainState)
    loss_scaler: Any = None                       # timm NativeScaler (fp16 on CUDA)
    lr_scheduler: Any = None
    mixup_fn: Callable | None = None
    model_ema: Any = None                         # timm ModelEmaV3, updated after every optimizer step
    parameters: Callable[[], Iterable] = list     # the trainable parameters (gradient clipping)
    after_step: list[Callable[[int], None]] = field(default_factory=list)  # hooks called with the new global step
    clock: Any = None                             # progress.RunClock: the whole-run ETA of the progress lines

    @property
    def global_step(self) -> int:
        """Optimizer steps taken so far (the state's)."""
        return self.state.global_step


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
                            f"{unwrap(net).describe(cfg)}); lower --lr or set --clip-grad; what was written before "
                            f"(the last good checkpoint, finished runs) is kept")


def _forward_loss(model: nn.Module, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor, cfg_id: int,
                  settings: LoopSettings) -> torch.Tensor:
    """The stitch's loss; autocast covers the forward, and the loss (with the teacher) too unless --no-amp-loss
    (SN-Net's Swin computed its loss outside autocast: docs/snnet_compat.md, C19)."""
    with amp_context(settings.device, settings.amp_dtype):
        out = model(x, cfg_id)
        if settings.amp_loss:
            return loss_fn(x, out, y)
    return loss_fn(x, out, y)


def _optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, ctx: TrainContext,
                    zero_grad: bool = True, update: bool = True) -> None:
    """Backward of `loss`; with gradient accumulation the first micro-batch of a step zeroes the gradients
    (`zero_grad`) and the last clips and steps (`update`), as timm's need_update."""
    settings = ctx.settings
    if zero_grad:
        optimizer.zero_grad(set_to_none=True)
    if ctx.loss_scaler is not None:
        ctx.loss_scaler(loss, optimizer, clip_grad=settings.clip_grad, clip_mode=settings.clip_mode,
                        parameters=ctx.parameters(), need_update=update)
        return
    loss.backward()
    if not update:
        return
    if settings.clip_grad is not None:
        dispatch_clip_grad(ctx.parameters(), settings.clip_grad, mode=settings.clip_mode)
    optimizer.step()


def _skip_trained(state: TrainState, i: int, skip: int) -> bool:
    """While resuming mid-epoch: True for batches already trained (read, not trained: the loader's randomness is
    replayed), restoring the RNG states the interrupted run had after steps skip-1 and skip."""
    if i > skip:
        return False
    rng = state.restore[0] if i == skip - 1 else state.restore[1] if i == skip else None
    if rng is not None:
        set_rng_state(rng)
    return True


def train_one_epoch(epoch: int, model: nn.Module, loader: Batches, optimizer: torch.optim.Optimizer,
                    loss_fn: Callable, ctx: TrainContext) -> OrderedDict[str, float]:
    """One epoch of optimizer steps; each step trains the stitch ``ctx.sampler(state.global_step)`` on
    --grad-accum-steps micro-batches (loss divided by their number, DDP gradient sync on the last one only); the
    loader's last len(loader) % N batches are dropped. Returns the mean loss over all ranks' samples;
    ``ctx.state`` advances."""
    model.train()
    settings, state = ctx.settings, ctx.state
    accum = max(1, settings.accum_steps)
    steps = len(loader) // accum
    skip, state.skip, state.epoch = state.skip, 0, epoch
    progress = Progress(f"Train: {epoch}", steps, settings.log_interval, done=skip,
                        run_eta=ctx.clock.remaining if ctx.clock is not None else None)
    if not skip:
        state.epoch_loss = [0.0, 0.0]
    state.rng_after.clear()
    step_loss, step_samples = 0.0, 0
    for i, (x, y) in enumerate(loader, start=1):
        if i > steps * accum:  # fewer than N batches left: not a whole step
            break
        if _skip_trained(state, i, skip * accum):
            continue
        micro = (i - 1) % accum
        update = micro == accum - 1
        if settings.move_batches:
            x, y = x.to(settings.device, non_blocking=True), y.to(settings.device, non_blocking=True)
        if ctx.mixup_fn is not None:
            x, y = ctx.mixup_fn(x, y)
        cfg_id = ctx.sampler(state.global_step)  # per optimizer step: its micro-batches all train this stitch
        with contextlib.nullcontext() if update or not hasattr(model, "no_sync") else model.no_sync():
            loss = _forward_loss(model, loss_fn, x, y, cfg_id, settings)
            _check_finite(loss, epoch, state.global_step, cfg_id, model)
            _optimizer_step(loss / accum if accum > 1 else loss, optimizer, ctx, zero_grad=micro == 0,
                            update=update)
        value = float(loss.detach().double().cpu())
        state.epoch_loss[0] += value * x.shape[0]
        state.epoch_loss[1] += x.shape[0]
        step_loss, step_samples = step_loss + value, step_samples + x.shape[0]
        if settings.snapshot_rng:
            state.rng_after.append(rng_state())  # nothing below draws random numbers
        if not update:
            continue
        state.global_step += 1
        if ctx.model_ema is not None:  # timm's step argument: the number of updates so far
            ctx.model_ema.update(unwrap(model), step=state.global_step)
        state.epoch_step = i // accum
        for hook in ctx.after_step:
            hook(state.global_step)
        if ctx.lr_scheduler is not None and settings.sched_on_updates:
            ctx.lr_scheduler.step_update(num_updates=state.global_step)
        lr = sum(g["lr"] for g in optimizer.param_groups) / len(optimizer.param_groups)
        progress.update(state.epoch_step, step_samples, f"loss {step_loss / accum:.4f} (avg "
                                                        f"{state.epoch_loss[0] / state.epoch_loss[1]:.4f}) "
                                                        f"lr {lr:.3e}")
        step_loss, step_samples = 0.0, 0
    stats = torch.tensor(state.epoch_loss, dtype=torch.float64)
    if world()[1] > 1:
        stats = all_reduce_sum(stats)  # on the backend's device (nccl: CUDA tensors only)
    return OrderedDict(loss=float(stats[0] / max(stats[1], 1)))


class _Counts:
    """Per-stitch sums (top-1 hits, top-5 hits, loss, samples) in float64, reduced over ranks at the end. The sums
    stay on the logits' device until then: no host sync per stitch and batch (on CUDA each would wait for the GPU)."""

    def __init__(self, cfg_ids: Sequence[int]):
        self.rows = {c: i for i, c in enumerate(cfg_ids)}
        self.table = torch.zeros(len(cfg_ids), 4, dtype=torch.float64)

    def add(self, cfg_id: int, logits: torch.Tensor, y: torch.Tensor) -> None:
        logits = logits.float()
        if self.table.device != logits.device:  # the first batch: the sums move to where the logits are
            self.table = self.table.to(logits.device)
        hit = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(y[:, None])
        row = self.table[self.rows[cfg_id]]
        row[0] += hit[:, :1].sum()
        row[1] += hit.sum()
        row[2] += F.cross_entropy(logits, y, reduction="sum").double()
        row[3] += y.shape[0]

    def metrics(self) -> OrderedDict[int, dict[str, float]]:
        if world()[1] > 1:
            self.table = all_reduce_sum(self.table)
        table = self.table.cpu()  # the one host sync of the evaluation
        out = OrderedDict()
        for cfg_id, row in self.rows.items():
            c1, c5, loss, n = table[row].tolist()
            n = max(n, 1)
            out[cfg_id] = {"acc1": 100.0 * c1 / n, "acc5": 100.0 * c5 / n, "loss": loss / n, "samples": int(n)}
        return out


class PerImage:
    """Per-image predictions of chosen stitches (``--save-predictions``): each image's sample id and label, and per
    stitch its top-5 classes and top softmax probability (no logits). Collected per batch on each rank; `gather`
    joins the ranks' shards on every rank, ordered by sample id. Stitches not chosen cost nothing."""

    def __init__(self, cfg_ids: Sequence[int]):
        self.cfg_ids = sorted(set(cfg_ids))
        self.ids: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.top: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {c: [] for c in self.cfg_ids}
        self.arrays: dict[str, Any] | None = None   # after `gather`: sample_id, label, per_stitch {cfg: (topk, p)}
        self.num_classes = 0

    def batch(self, ids: torch.Tensor, y: torch.Tensor) -> None:
        self.ids.append(ids.detach().to("cpu", torch.int64).reshape(-1))
        self.labels.append(y.detach().to("cpu", torch.int64).reshape(-1))

    def add(self, cfg_id: int, logits: torch.Tensor) -> None:
        logits = logits.float()
        self.num_classes = logits.shape[1]
        top = logits.topk(min(5, logits.shape[1]), dim=1)  # the indices _Counts scores: the same top-1
        prob = (top.values[:, 0] - torch.logsumexp(logits, dim=1)).exp()
        self.top[cfg_id].append((top.indices.to("cpu", torch.int64), prob.to("cpu", torch.float32)))

    def gather(self) -> None:
        if world()[1] > 1:  # a rank without images learns the number of classes from the others
            classes = all_gather_rows(torch.tensor([[self.num_classes]], dtype=torch.int64))
            self.num_classes = int(classes.max())
        k = min(5, self.num_classes)
        ints = torch.cat([torch.stack([torch.cat(self.ids), torch.cat(self.labels)], 1)] +
                         [torch.cat([t for t, _ in self.top[c]]) for c in self.cfg_ids], 1) if self.ids else \
            torch.zeros(0, 2 + k * len(self.cfg_ids), dtype=torch.int64)
        probs = torch.stack([torch.cat([p for _, p in self.top[c]]) for c in self.cfg_ids], 1) if self.ids else \
            torch.zeros(0, len(self.cfg_ids))
        if world()[1] > 1:
            ints, probs = all_gather_rows(ints), all_gather_rows(probs)
        ints, probs = ints.numpy(), probs.numpy()
        ids, first = np.unique(ints[:, 0], return_index=True)  # ascending sample ids, each image once
        ints, probs = ints[first], probs[first]
        self.arrays = {"sample_id": ids, "label": ints[:, 1], "per_stitch": {
            c: (ints[:, 2 + i * k: 2 + (i + 1) * k], probs[:, i]) for i, c in enumerate(self.cfg_ids)}}


@torch.no_grad()
def evaluate_stitches(net: nn.Module, loader: Batches, cfg_ids: Sequence[int], device: torch.device,
                      amp_dtype: torch.dtype | None = None, log_interval: int = 50, shared_prefixes: bool = True,
                      stats: dict | None = None, per_image: PerImage | None = None
                      ) -> OrderedDict[int, dict[str, float]]:
    """Top-1/top-5 (percent) and mean cross-entropy per stitch, reduced over ranks.

    One pass over the data for all stitches: each batch is decoded once and every route runs on it; with
    `shared_prefixes` the routes are walked as a trie so each distinct prefix is computed once per batch
    (snnet/stitching/route_tree.py). ``shared_prefixes=False`` runs each route from the input (for comparison).

    A batch is (images, labels) or (images, labels, sample ids) (`create_eval_loader`). Its images are one tensor,
    read by every route, or a list of tensors of the same images preprocessed
    per input group (`create_eval_loader` with several data configs), of which each route reads its front
    anchor's (``model.route_input``: a `ComposedNet`'s ``input_groups``): one tensor per root of the trie.

    `per_image` (a `PerImage`) also records the per-image predictions of its stitches, which must be among
    `cfg_ids`; it needs batches with sample ids (a single process may go without: images are then numbered in order).
    """
    net.eval()
    model = unwrap(net)
    routes = {c: model.routes[model.check_cfg_id(c)] for c in cfg_ids}
    tree = RouteTree(routes)
    counts = _Counts(cfg_ids)
    progress = Progress(f"Eval {len(cfg_ids)} stitch(es)", len(loader), log_interval,
                        per_phase=(len(cfg_ids), "stitches"))
    peak = seen = 0
    if per_image is not None and set(per_image.cfg_ids) - set(cfg_ids):
        raise ValueError(f"per-image predictions of cfg_ids {sorted(set(per_image.cfg_ids) - set(cfg_ids))} that "
                         f"are not evaluated")
    for i, batch in enumerate(loader, start=1):
        x, y = batch[0], batch[1].to(device, non_blocking=True)  # batch[2], when there: the images' sample ids
        if isinstance(x, torch.Tensor):
            x = x.to(device, non_blocking=True)
            inputs = x
        else:  # one tensor per input group: each route reads its front anchor's
            x = [t.to(device, non_blocking=True) for t in x]
            inputs = lambda first_step, x=x: model.route_input(x, first_step)
        emit = lambda cfg_id, logits, y=y: counts.add(cfg_id, logits, y)
        if per_image is not None:
            emit = _recording(emit, per_image, batch, y, seen)
            seen += y.shape[0]
        with amp_context(device, amp_dtype):
            if shared_prefixes:
                peak = max(peak, tree.run(model.run_step, inputs, emit, track_bytes=stats is not None))
            else:
                for cfg_id, steps in routes.items():
                    emit(cfg_id, model.run_steps(steps, inputs if isinstance(inputs, torch.Tensor) else
                                                 inputs(steps[0])))
        progress.update(i, y.shape[0])
    if stats is not None:
        stats["peak_activation_bytes"] = peak
    if per_image is not None:
        per_image.gather()
    return counts.metrics()


def _recording(emit: Callable, per_image: PerImage, batch: Sequence, y: torch.Tensor, seen: int) -> Callable:
    """`emit` that also records the chosen stitches' predictions of this batch."""
    if len(batch) > 2:
        ids = torch.as_tensor(batch[2])
    elif world()[1] == 1:
        ids = torch.arange(seen, seen + y.shape[0])
    else:
        raise ValueError("per-image predictions under several processes need batches with sample ids "
                         "(create_eval_loader's (images, labels, ids))")
    per_image.batch(ids, y)
    chosen = set(per_image.cfg_ids)

    def both(cfg_id: int, logits: torch.Tensor) -> None:
        emit(cfg_id, logits)
        if cfg_id in chosen:
            per_image.add(cfg_id, logits)
    return both


def default_val_panel(num_configs: int, n_anchors: int, extra: int = 4) -> list[int]:
    """Anchors plus a few evenly spread stitches: validated after every epoch (the full sweep runs at the end)."""
    stitched = list(range(n_anchors, num_configs))
    step = max(1, len(stitched) // max(extra, 1))
    return list(range(n_anchors)) + stitched[step // 2::step][:extra]
