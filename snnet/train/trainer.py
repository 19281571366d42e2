"""One trainer for train.py and stitch-train: what both build to train a network and the epoch loop around
`engine.train_one_epoch`.

`create_trainer` builds, from the run's options (`RunOptions`) and where it trains (`TrainSetup`), the optimizer
(with the LR rule), the fp16 loss scaler, the LR schedule (fast-forwarded on resume), timm's ModelEmaV3
(``model_ema``), gradient checkpointing, torch.compile of the blocks, DDP under several processes and the loop's
context (`engine.TrainContext`: its settings, such as accumulation, clipping and autocast of the loss, and the
training state).
`Trainer.fit` runs the epochs: per-epoch seeds, the sampler's and shard stream's epoch, mixup's end, one epoch of
optimizer steps, BatchNorm statistics across processes, the caller's validation, the scheduler step and the
caller's end of the epoch. A caller adds to the loop by an `EpochHooks` subclass (`snnet.train.hooks`; state as
attributes, hooks as methods): train.py's checkpoints, summary.csv and loggers (`snnet.train.main.RunEpochs`),
stitch-train's trajectory (`snnet.explore.stitch_train.runner.RunTrajectory`)."""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from timm.utils import ModelEmaV3, NativeScaler, distribute_bn
from torch import nn

from snnet.stitching.cost import cost_table
from snnet.stitching.model import RoutedNet
from snnet.train.engine import LoopSettings, TrainContext, TrainState, train_one_epoch
from snnet.train.hooks import EpochHooks
from snnet.train.optim import create_optimizer, create_scheduler, epoch_offset
from snnet.train.options import RunOptions, ScheduleOptions, TrainOptions
from snnet.train.resolved import ResolvedRun, resolve_run
from snnet.train.resume import resume_counters
from snnet.train.sampler import seed_epoch
from snnet.utils.checkpoint import CheckpointError, StateDictMismatch
from snnet.utils.distributed import world
from snnet.utils.errors import UsageError

_logger = logging.getLogger("snnet")


def create_model_ema(model: RoutedNet, train: TrainOptions, resume_state: dict | None = None,
                     resumed_from: str = "") -> ModelEmaV3 | None:
    """--model-ema: timm's ModelEmaV3 of the network, restored from the checkpoint's state_dict_ema (a checkpoint
    without one starts it from the resumed weights, as timm's load_checkpoint(use_ema=True) falls back)."""
    if not train.model_ema:
        return None
    ema = ModelEmaV3(model, decay=train.model_ema_decay, use_warmup=train.model_ema_warmup)
    if resume_state is not None and "state_dict_ema" in resume_state:
        try:
            ema.module.load_checkpoint_state(resume_state["state_dict_ema"])
        except StateDictMismatch as e:
            raise CheckpointError(f"--resume {resumed_from!r}: its state_dict_ema does not fit this model "
                                  f"({e})") from None
    elif resume_state is not None:
        _logger.info("--model-ema: the checkpoint has no EMA weights; the EMA starts from the resumed weights")
    return ema


@dataclass(frozen=True)
class TrainSetup:
    """Where and how one process trains, besides the run's options: device and precision, the stitch each step
    trains (`sampler`), mixup, the checkpoint resumed, the input size FLOPs are traced at before torch.compile
    (C, H, W), what every optimizer step calls after it (`after_step`), and whether the loop snapshots the RNG
    after each batch (`snapshot_rng`: recovery checkpoints need it), and the run's `ResolvedRun` (`resolved`: the
    global batch, rates and schedule train.py's preflight checked; None: resolved from the options here)."""
    device: torch.device
    amp_dtype: torch.dtype | None
    sampler: Callable[[int], int]
    mixup_fn: Callable | None = None
    resume_state: dict | None = None
    input_size: Sequence[int] | None = None
    after_step: Sequence[Callable[[int], None]] = ()
    snapshot_rng: bool = False
    resolved: ResolvedRun | None = None


@dataclass
class Trainer:
    """A network being trained: what `create_trainer` built, and the epoch loop (`fit`)."""
    model: RoutedNet                 # the network
    net: nn.Module                   # what runs the steps: `model`, or its DDP wrapper under several processes
    loader: Any
    optimizer: torch.optim.Optimizer
    loss_fn: Callable
    ctx: TrainContext
    epochs: range
    lr: float
    train: TrainOptions
    schedule: ScheduleOptions
    rank: int = 0
    world_size: int = 1
    compiled: int = 0                # block modules torch.compile compiled
    mixup_off_epoch: int = 0         # --mixup-off-epoch: mixup/cutmix end at this epoch

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (the last len(loader) % accumulation batches are dropped)."""
        return len(self.loader) // self.ctx.settings.accum_steps

    @property
    def state(self) -> TrainState:
        """Where training stands (the steps taken; what a recovery checkpoint holds)."""
        return self.ctx.state

    @property
    def ema(self) -> RoutedNet | None:
        """The EMA's network (--model-ema), or None."""
        return self.ctx.model_ema.module if self.ctx.model_ema is not None else None

    @property
    def eval_model(self) -> nn.Module:
        """What validation and the result evaluate: the EMA's weights when on (as timm), else the network."""
        return self.ema if self.ema is not None else self.net

    @property
    def current_lr(self) -> float:
        return sum(g["lr"] for g in self.optimizer.param_groups) / len(self.optimizer.param_groups)

    def distribute_bn(self, module: nn.Module) -> None:
        """--dist-bn broadcast/reduce: BatchNorm statistics across processes (timm's distribute_bn)."""
        if self.train.distributed and self.train.dist_bn in ("broadcast", "reduce"):
            distribute_bn(module, self.world_size, self.train.dist_bn == "reduce")

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One epoch of optimizer steps, seeded per (seed, rank, epoch), then the BatchNorm statistics synced."""
        seed_epoch(self.train.seed, self.rank, epoch)
        sampler: Any = getattr(self.loader, "sampler", None)  # a plain list of batches is a loader too
        dataset: Any = getattr(self.loader, "dataset", None)
        if self.train.distributed and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        if hasattr(dataset, "set_epoch"):  # a shard stream: the epoch's order is drawn from (seed, epoch)
            dataset.set_epoch(epoch)
        mixup: Any = self.ctx.mixup_fn  # timm's Mixup
        if mixup is not None and self.mixup_off_epoch and epoch >= self.mixup_off_epoch:
            mixup.mixup_enabled = False
        metrics = train_one_epoch(epoch, self.net, self.loader, self.optimizer, self.loss_fn, self.ctx)
        return metrics

    def fit(self, hooks: EpochHooks | None = None) -> dict[str, float]:
        """The epochs: `hooks.start_epoch`, one epoch of training, `hooks.trained`, BatchNorm statistics across
        processes, `hooks.validate` (the metrics, the scheduler's metric), the scheduler step, then
        `hooks.end_epoch`. Returns the last epoch's training metrics."""
        hooks = hooks or EpochHooks()
        train_metrics: dict[str, float] = {"loss": float("nan")}
        for epoch in self.epochs:
            hooks.start_epoch(epoch)
            train_metrics = self.train_epoch(epoch)
            hooks.trained(epoch)
            self.distribute_bn(self.model)
            metrics, metric = hooks.validate(epoch, train_metrics)
            lr = self.current_lr
            self.ctx.lr_scheduler.step(epoch + 1 - epoch_offset(self.schedule), metric)
            hooks.end_epoch(epoch, train_metrics, metrics, lr)
        return train_metrics

    def use_ema_weights(self) -> None:
        """Copy the EMA's weights into the network (what a result then evaluates and saves); nothing without EMA."""
        if self.ema is not None:
            self.model.load_state_dict(self.ema.state_dict())


def create_trainer(model: RoutedNet, loader: Any, loss_fn: Callable, options: RunOptions,
                   setup: TrainSetup) -> Trainer:
    """Optimizer, scaler, schedule, EMA, compile and the loop context for `model` on `loader`, from the run's
    options, resumed where `setup.resume_state` (a checkpoint) left off. FLOPs are traced at `setup.input_size`
    before torch.compile, which torch.jit's tracer cannot enter."""
    optim, schedule, train = options.optim, options.schedule, options.train
    device, amp_dtype, resume_state, input_size = setup.device, setup.amp_dtype, setup.resume_state, setup.input_size
    rank, world_size = world()
    accum = max(1, train.grad_accum_steps)
    resolved = setup.resolved if setup.resolved is not None else resolve_run(options, world_size)
    lr, warmup_lr, min_lr = resolved.lr, resolved.warmup_lr, resolved.min_lr
    optimizer = create_optimizer(optim, model, lr)
    loss_scaler = NativeScaler(device=device.type) if amp_dtype == torch.float16 else None
    start_epoch, global_step = resume_counters(train, resume_state, optimizer, loss_scaler)
    steps = len(loader) // accum  # optimizer steps per epoch; the remainder batches are dropped
    if steps == 0:
        raise UsageError(f"--grad-accum-steps {accum} exceeds the {len(loader)} training batch(es) per process and "
                         f"epoch; lower it or -b/--batch-size")
    scheduler, num_epochs = create_scheduler(schedule, optimizer, steps, warmup_lr, min_lr, start_epoch,
                                             global_step if resume_state is not None else None,
                                             eval_metric=options.eval.eval_metric)
    settings = LoopSettings(device, amp_dtype, accum_steps=accum, clip_grad=optim.clip_grad,
                            clip_mode=optim.clip_mode, amp_loss=not train.no_amp_loss,
                            move_batches=train.no_prefetcher, sched_on_updates=schedule.sched_on_updates,
                            log_interval=train.log_interval, snapshot_rng=setup.snapshot_rng)
    ctx = TrainContext(setup.sampler, settings, TrainState(global_step=global_step), loss_scaler, scheduler,
                       setup.mixup_fn, model_ema=create_model_ema(model, train, resume_state, options.job.resume),
                       parameters=lambda: [p for p in model.parameters() if p.requires_grad],
                       after_step=list(setup.after_step))
    if train.grad_checkpointing:
        model.set_grad_checkpointing(True)
    compiled = 0
    if train.torchcompile:  # after the EMA's copy; FLOPs are traced by torch.jit, which cannot enter compiled code
        if input_size is not None:  # so trace them now
            cost_table(model, (int(input_size[1]), int(input_size[2])), int(input_size[0]))
        compiled = model.compile_blocks(train.torchcompile)
    net: nn.Module = model
    if train.distributed:  # each process trains its own stitch, so the used parameters differ between processes
        ddp_kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
        net = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True, **ddp_kwargs)
    return Trainer(model, net, loader, optimizer, loss_fn, ctx, range(start_epoch, num_epochs), lr, train, schedule,
                   rank, world_size, compiled, options.loss.mixup_off_epoch)


__all__ = ["EpochHooks", "TrainSetup", "Trainer", "create_model_ema", "create_trainer"]
