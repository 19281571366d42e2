"""The trainer, for train.py and stitch-train alike: a network with its optimizer (and the LR rule), fp16 loss scaler,
LR schedule (fast-forwarded on resume), timm's ModelEmaV3, the sampler that picks each step's stitch and the
training state; `fit` runs the epochs, `train_one_epoch` one epoch of optimizer steps, each calling
``model(x, cfg_id)``.

train.py builds its trainer from its resolved configuration (`Trainer.for_run`: data, network, least-squares init
or resume, sampler, loss, and the epoch records `EpochRecords`: validation panel, checkpoints, summary.csv,
loggers, recovery) and ends with `evaluate` (every stitch into stitches_res.txt). stitch-train builds one from its
own network and loader (`Trainer(...)`) and adds to the epochs by an `EpochHooks` subclass."""
from __future__ import annotations

import contextlib
import json
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from timm.data import resolve_data_config
from timm.layers import convert_splitbn_model
from timm.utils import ModelEmaV3, NativeScaler, dispatch_clip_grad, distribute_bn, random_seed
from torch import nn

from snnet.data.datasets import class_names_of, create_datasets, data_source, num_classes_of
from snnet.data.loaders import create_eval_loader, create_train_loader
from snnet.results.records import EMA_RESULTS_FILE, RESULTS_FILE, ResultsFile, file_sha256, text_sha256
from snnet.stitching.config import StitchConfig
from snnet.stitching.cost import cost_table
from snnet.stitching.model import RoutedNet
from snnet.train.describe import describe_run, recorded_arguments, to_yaml
from snnet.train.device import amp_context, init_distributed, unwrap
from snnet.train.evaluator import evaluate_all, panel_cfg_ids, validate_stitches
from snnet.train.loggers import Loggers, create_loggers
from snnet.train.losses import create_loss
from snnet.train.ls_data import run_ls_init
from snnet.train.network import build_network, check_train_exclude
from snnet.train.optim import anchor_lr_scale, create_optimizer, create_scheduler, epoch_offset
from snnet.train.options import RunOptions
from snnet.train.positions import write_stitch_plan
from snnet.train.preempt import STOP
from snnet.train.preflight import check_cfg_ids
from snnet.train.resume import (
    Recovery,
    TrainState,
    append_summary,
    continue_epoch,
    fitting_checkpoint,
    resume_counters,
    truncate_summary,
)
from snnet.train.sampler import rng_state, run_sampler, seed_epoch, set_rng_state
from snnet.utils.checkpoint import (
    LAST,
    CheckpointError,
    CheckpointSaver,
    StateDictMismatch,
    state_sha256,
    training_state,
)
from snnet.utils.distributed import all_reduce_sum, world
from snnet.utils.errors import SNNetError, UsageError
from snnet.utils.fileio import disk_full_error, is_disk_full, write_text_atomic
from snnet.utils.progress import Progress, RunClock

_logger = logging.getLogger("snnet")


class NonFiniteLoss(SNNetError):
    """The loss became NaN or infinite: the run stops (exit code 3); what was written before it is kept (the last
    good checkpoint; a sweep's finished runs)."""
    exit_code = 3


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


class Trainer:
    """A network being trained.

    Args:
        model: the network (an `SNNet`, or a `PlainNet` holding one timm model), on its device.
        loader: the training batches (a DataLoader, or a list of (images, labels) pairs); None for a trainer that
            only evaluates (train.py --eval: no optimizer, schedule or EMA).
        loss_fn: ``loss_fn(images, logits, labels)``, the distillation loss's signature.
        options: the resolved run options: optimizer, schedule, loop, precision and device (``options.device``).
        sampler: ``sampler(global_step) -> cfg_id``, the stitch each optimizer step trains.
        mixup_fn: timm's Mixup, or None.
        resume_state: a checkpoint to continue from (weights already loaded: its optimizer, scaler, EMA, counters).
        input_size: (C, H, W) the FLOPs are traced at before torch.compile, which torch.jit cannot enter.
        snapshot_rng: snapshot the RNG after each batch (recovery checkpoints need it).
    """

    def __init__(self, model: RoutedNet, loader: Any, loss_fn: Callable | None, options: RunOptions,
                 sampler: Callable[[int], int] | None, *, mixup_fn: Callable | None = None,
                 resume_state: dict | None = None, input_size: Sequence[int] | None = None, snapshot_rng: bool = False):
        optim, schedule, train = options.optim, options.schedule, options.train
        self.options, self.model, self.loader, self.loss_fn = options, model, loader, loss_fn
        self.sampler, self.mixup_fn, self.snapshot_rng = sampler, mixup_fn, snapshot_rng
        self.rank, self.world_size = world()
        self.net: nn.Module = model  # what runs the steps: the model, or its DDP wrapper under several processes
        self.model_ema: ModelEmaV3 | None = None
        self.epochs = range(0)
        # set by `for_run` (train.py): its data, identity, loggers and epoch records
        self.val_ds: Any = None
        self.data_cfg: dict[str, Any] = {}
        self.identity = self.args_json = self.eval_hash = ""
        self.loggers = Loggers()
        self.records: EpochRecords | None = None
        if loader is None:
            return
        self.optimizer = create_optimizer(optim, model, options.lr)
        self.loss_scaler = NativeScaler(device=self.device.type) if self.amp_dtype == torch.float16 else None
        start_epoch, global_step = resume_counters(train, resume_state, self.optimizer, self.loss_scaler)
        if self.steps_per_epoch == 0:
            raise UsageError(f"--grad-accum-steps {self.accum_steps} exceeds the {len(loader)} training batch(es) per "
                             f"process and epoch; lower it or -b/--batch-size")
        self.lr_scheduler, num_epochs = create_scheduler(
            schedule, self.optimizer, self.steps_per_epoch, options.warmup_lr, options.min_lr, start_epoch,
            global_step if resume_state is not None else None, eval_metric=options.eval.eval_metric)
        self.epochs = range(start_epoch, num_epochs)
        self.state = TrainState(global_step=global_step)
        self.model_ema = create_model_ema(model, options, resume_state)
        self.after_step: list[Callable[[int], None]] = []  # called with the new global step after each update
        if train.grad_checkpointing:
            model.set_grad_checkpointing(True)
        if train.torchcompile:  # after the EMA's copy; FLOPs are traced by torch.jit, which cannot enter compiled code
            if input_size is not None:  # so trace them now
                cost_table(model, (int(input_size[1]), int(input_size[2])), int(input_size[0]))
            model.compile_routes(train.torchcompile)
        if train.distributed:  # each process trains its own stitch, so the used parameters differ between processes
            ddp_kwargs = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
            self.net = nn.parallel.DistributedDataParallel(  # one network (a plain --model) uses every parameter
                model, find_unused_parameters=model.num_configs > 1, **ddp_kwargs)

    # ------------------------------------------------------------------------------------------------- train.py
    @classmethod
    def for_run(cls, options: RunOptions, stitch_cfg: StitchConfig | None) -> Trainer:
        """train.py's trainer from its resolved options: the process group, the datasets (the number of classes
        and their names when no flag gives them), the network (positions chosen from data when the config asks;
        written to <output>/stitch_plan.json), args.yaml, the least-squares init of the stitching layers unless
        they come from a checkpoint, the checkpoint resumed, the sampler, the training loader and loss, and the
        epoch records. With --eval nothing is trained: the returned trainer only evaluates (`evaluate`)."""
        job, out_dir = options.job, options.out_dir
        placement = init_distributed(options.train.device, job.dist_backend, job.dist_url)  # the process group
        if placement.world_size != options.world_size:
            raise UsageError(f"the process group has {placement.world_size} process(es), the launch said "
                             f"{options.world_size}; launch with torchrun (distributed_train.sh) or srun")
        rank = placement.rank
        random_seed(options.train.seed, 0)  # the network's random parts are the same on every rank
        if rank != 0:
            logging.getLogger().setLevel(logging.WARNING)
        train_ds, val_ds = create_datasets(options.data, need_train=not job.eval)
        data = train_ds if train_ds is not None else val_ds
        options = options.replaced(  # the data's classes, known now: recorded with the run (export, serve name them)
            num_classes=options.network.num_classes or num_classes_of(data) or (
                stitch_cfg.get("num_classes") if stitch_cfg is not None else None),
            class_names=class_names_of(data))
        recorded = recorded_arguments(options, distributed=placement.distributed, rank=rank,
                                      world_size=placement.world_size, local_rank=placement.local_rank,
                                      class_names=options.network.class_names)
        selected = stitch_cfg is not None and "select" in (stitch_cfg.get("positions") or {})
        net, stitch_cfg = build_network(options.network_to_build(), stitch_cfg, train_ds)
        assert net is not None  # None only for structure_only
        if selected:  # the stitches are known only now: what the preflight could not check on them
            check_train_exclude(net, stitch_cfg)
            check_cfg_ids(options, net)
        if rank != 0:  # then each rank its own stream (augmentation, dropout); rank 0's goes on unchanged
            random_seed(options.train.seed, rank)
        net = prepare(net, options)
        data_cfg = resolve_data_config(options.input.data_config_args(), model=net)
        identity = network_identity(options, stitch_cfg, data_cfg)
        if rank == 0 and stitch_cfg is not None:  # explicit or selected "positions"
            write_stitch_plan(net, out_dir)
        resume_state = fitting_checkpoint(net, job.resume) if job.resume else None
        if job.initial_checkpoint:
            net.load_checkpoint_state(fitting_checkpoint(net, job.initial_checkpoint)["state_dict"])
        eval_hash = ""
        if job.eval:  # what is evaluated, and the results file it would continue: refused now, not after the LS init
            # no checkpoint: the network's own weights (anchors as built; the LS init is a function of them, the seed
            # and the data) are its identity, so a cached evaluation of other anchor weights is never taken for it
            eval_hash = file_sha256(job.resume) if job.resume else text_sha256(
                f"init:{options.train.seed}:{identity}:{state_sha256(net.checkpoint_state())}")
            if rank == 0:
                ResultsFile(out_dir / RESULTS_FILE, eval_hash, text_sha256(identity),
                            data_source(val_ds) if val_ds is not None else None).completed()
        _logger.info("data: " + ", ".join(f"{k} {v}" for k, v in data_cfg.items()))  # after every check
        if rank == 0 and not job.eval:  # the resolved run, after every check and before any work
            write_text_atomic(out_dir / "args.yaml", to_yaml(describe_run(options, stitch_cfg, options.device.type,
                                                                          net=net, recorded=recorded)))
        loggers = create_loggers(replace(options.logging, run_config=recorded), out_dir, rank == 0)
        if wants_ls_init(options, stitch_cfg, resume_state):
            assert stitch_cfg is not None  # only an SN-Net has stitching layers to fit
            run_ls_init(net, data, stitch_cfg, options, data_cfg)
        if resume_state is not None:
            net.load_checkpoint_state(resume_state["state_dict"])  # read once, fit checked above
        if job.eval:  # evaluates only: no optimizer, schedule or loader
            trainer = cls(net, None, None, options, None)
        else:
            freeze(net, stitch_cfg, options.train.freeze_anchors)
            loader = create_train_loader(train_ds, options.loader, data_cfg, options.device)
            loss_fn, mixup_fn = create_loss(options.loss, options.device,
                                             stitch_cfg.labelled() if stitch_cfg is not None else None)
            sampler = run_sampler(net, stitch_cfg, options.train.seed, rank, sync=options.train.sample_sync,
                                  freeze_anchors=options.train.freeze_anchors)
            trainer = cls(net, loader, loss_fn, options, sampler, mixup_fn=mixup_fn, resume_state=resume_state,
                          input_size=data_cfg["input_size"],
                          snapshot_rng=options.train.recovery_interval > 0 or STOP.installed)
            continue_epoch(trainer.state, resume_state, trainer.accum_steps)
        trainer.val_ds, trainer.data_cfg, trainer.identity = val_ds, data_cfg, identity
        trainer.args_json = json.dumps(dict(recorded), default=str)
        trainer.loggers, trainer.eval_hash = loggers, eval_hash
        if job.eval:
            return trainer
        trainer.records = EpochRecords(trainer, val_ds, resume_state)
        trainer.records.recovery.install()
        if rank == 0:
            trainer.log_start()
        return trainer

    def log_start(self) -> None:
        options, train = self.options, self.options.train
        _logger.info(f"output: {options.out_dir}; {self.model.num_configs} network(s); lr {self.lr:.3e} (anchors "
                     f"x{anchor_lr_scale(options.optim)}); {self.steps_per_epoch} steps/epoch"
                     + (f" of {self.accum_steps} batches" if self.accum_steps > 1 else "")
                     + f"; {self.world_size} process(es); amp {self.amp_dtype}"
                     + (f"; torch.compile ({train.torchcompile}) of each route at its first step"
                        if train.torchcompile else "")
                     + ("; gradient checkpointing" if train.grad_checkpointing else "")
                     + (f"; EMA decay {train.model_ema_decay}" if self.ema is not None else ""))

    def evaluate(self) -> None:
        """Every stitch on the validation split into <output>/stitches_res.txt (and the EMA's into
        stitches_res_ema.txt); the final front logged. A trained run without a validation split evaluates none."""
        options = self.options
        if options.job.eval:
            evaluate_all(self.net, self.val_ds, options, self.data_cfg, self.identity, self.eval_hash)
        elif self.val_ds is not None:
            # the run's folder may hold its earlier end's results (--auto-resume trained on): set aside, not mixed
            ckpt_hash = file_sha256(options.out_dir / LAST) if self.rank == 0 else ""
            evaluate_all(self.net, self.val_ds, options, self.data_cfg, self.identity, ckpt_hash, set_aside=True)
            if self.ema is not None:
                evaluate_all(self.ema, self.val_ds, options, self.data_cfg, self.identity, ckpt_hash,
                             EMA_RESULTS_FILE, set_aside=True)
        step = 0 if options.job.eval else self.epochs.stop
        self.loggers.log_final_front(options.out_dir / RESULTS_FILE, options.out_dir, step)
        self.loggers.close()

    # ------------------------------------------------------------------------------------------------- the loop
    @property
    def device(self) -> torch.device:
        return self.options.device

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return self.options.amp_dtype

    @property
    def lr(self) -> float:
        """The resolved base LR (the stitching layers'; the anchors' is x --anchor-lr-scale)."""
        return self.options.lr

    @property
    def accum_steps(self) -> int:
        """--grad-accum-steps: micro-batches per optimizer step."""
        return max(1, self.options.train.grad_accum_steps)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (the last len(loader) % accumulation batches are dropped)."""
        return len(self.loader) // self.accum_steps

    @property
    def ema(self) -> RoutedNet | None:
        """The EMA's network (--model-ema), or None."""
        return self.model_ema.module if self.model_ema is not None else None

    @property
    def eval_model(self) -> nn.Module:
        """What validation and the result evaluate: the EMA's weights when on (as timm), else the network."""
        return self.ema if self.ema is not None else self.net

    @property
    def current_lr(self) -> float:
        return sum(g["lr"] for g in self.optimizer.param_groups) / len(self.optimizer.param_groups)

    def distribute_bn(self, module: nn.Module) -> None:
        """--dist-bn broadcast/reduce: BatchNorm statistics across processes (timm's distribute_bn)."""
        train = self.options.train
        if train.distributed and train.dist_bn in ("broadcast", "reduce"):
            distribute_bn(module, self.world_size, train.dist_bn == "reduce")

    def fit(self, hooks: EpochHooks | None = None) -> dict[str, float]:
        """The epochs: `hooks.start_epoch`, one epoch of training, `hooks.trained`, BatchNorm statistics across
        processes, `hooks.validate` (the metrics, the scheduler's metric), the scheduler step, then
        `hooks.end_epoch`. `hooks`: the caller's (stitch-train), else the run's `EpochRecords` (train.py), else none.
        Returns the last epoch's training metrics."""
        hooks = hooks or self.records or EpochHooks()
        if self.records is not None and self.rank == 0:  # summary.csv's rows of epochs this run redoes
            truncate_summary(self.options.out_dir / "summary.csv", self.epochs.start)
        train_metrics: dict[str, float] = {"loss": float("nan")}
        for epoch in self.epochs:
            hooks.start_epoch(epoch)
            train_metrics = self.train_one_epoch(epoch)
            hooks.trained(epoch)
            self.distribute_bn(self.model)
            metrics, metric = hooks.validate(epoch, train_metrics)
            lr = self.current_lr
            self.lr_scheduler.step(epoch + 1 - epoch_offset(self.options.schedule), metric)
            hooks.end_epoch(epoch, train_metrics, metrics, lr)
        return train_metrics

    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        """One epoch of optimizer steps, seeded per (seed, rank, epoch); each step trains the stitch
        ``sampler(global_step)`` on --grad-accum-steps micro-batches (loss divided by their number, DDP gradient
        sync on the last one only); the loader's last len(loader) % N batches are dropped. Autocast covers the
        forward, and the loss (with the teacher) too unless --no-amp-loss. Returns the mean loss over all ranks'
        samples; `state` advances."""
        train, state, net, loader = self.options.train, self.state, self.net, self.loader
        sample, loss_fn = self.sampler, self.loss_fn
        assert sample is not None and loss_fn is not None, "a trainer built without a loader only evaluates"
        seed_epoch(train.seed, self.rank, epoch)
        sampler: Any = getattr(loader, "sampler", None)  # a plain list of batches is a loader too
        dataset: Any = getattr(loader, "dataset", None)
        if train.distributed and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        if hasattr(dataset, "set_epoch"):  # a shard stream: the epoch's order is drawn from (seed, epoch)
            dataset.set_epoch(epoch)
        mixup: Any = self.mixup_fn  # timm's Mixup
        if mixup is not None and self.options.loss.mixup_off_epoch and epoch >= self.options.loss.mixup_off_epoch:
            mixup.mixup_enabled = False
        net.train()
        accum, steps = self.accum_steps, self.steps_per_epoch
        skip, state.skip, state.epoch = state.skip, 0, epoch
        progress = Progress(f"Train: {epoch}", steps, train.log_interval, done=skip,
                            run_eta=self.records.clock.remaining if self.records is not None else None)
        if not skip:
            state.epoch_loss = [0.0, 0.0]
        state.rng_after.clear()
        state.pending.clear()
        step_samples = 0
        for i, (x, y) in enumerate(loader, start=1):
            if i > steps * accum:  # fewer than N batches left: not a whole step
                break
            if _skip_trained(state, i, skip * accum):
                continue
            micro = (i - 1) % accum
            update = micro == accum - 1
            if train.no_prefetcher:  # batches come on the CPU: the loop moves them
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self.mixup_fn is not None:
                x, y = self.mixup_fn(x, y)
            cfg_id = sample(state.global_step)  # per optimizer step: its micro-batches all train this stitch
            with contextlib.nullcontext() if update or not hasattr(net, "no_sync") else net.no_sync():
                with amp_context(self.device, self.amp_dtype):
                    out = net(x, cfg_id)
                    if not train.no_amp_loss:
                        loss = loss_fn(x, out, y)
                if train.no_amp_loss:
                    loss = loss_fn(x, out, y)
                if self.loss_scaler is None:  # nothing else would keep a non-finite step off the weights
                    _check_finite(math.isfinite(loss.item()), epoch, state.global_step, cfg_id, net, self.device)
                self._backward(loss / accum if accum > 1 else loss, zero_grad=micro == 0, update=update)
            # read back where shown or saved (`settle_losses`): a read here would stall the device every step
            state.pending.append((loss.detach(), x.shape[0], epoch, state.global_step, cfg_id))
            step_samples += x.shape[0]
            if self.snapshot_rng:
                state.rng_after.append(rng_state())  # nothing below draws random numbers
            if not update:
                continue
            state.global_step += 1
            if self.model_ema is not None:  # timm's step argument: the number of updates so far
                self.model_ema.update(self.model, step=state.global_step)
            state.epoch_step = i // accum
            for hook in self.after_step:
                hook(state.global_step)
            if self.options.schedule.sched_on_updates:
                self.lr_scheduler.step_update(num_updates=state.global_step)
            due = progress.due(state.epoch_step)  # by step count: every rank settles at the same steps
            if due:
                self.settle_losses()
            progress.update(state.epoch_step, step_samples, f"loss {state.last_loss:.4f} (avg "
                                                            f"{state.epoch_loss[0] / state.epoch_loss[1]:.4f}) "
                                                            f"lr {self.current_lr:.3e}" if due else "")
            step_samples = 0
        self.settle_losses()
        stats = torch.tensor(state.epoch_loss, dtype=torch.float64)
        if self.world_size > 1:
            stats = all_reduce_sum(stats)  # on the backend's device (nccl: CUDA tensors only)
        return OrderedDict(loss=float(stats[0] / max(stats[1], 1)))

    def settle_losses(self) -> None:
        """The losses of the steps since the last read, read back in one synchronisation and added to the epoch's
        sum in step order (`TrainState.epoch_loss`, `last_loss`: the latest step's mean over its micro-batches).
        Under a GradScaler the finiteness check happens here: the scaler skipped the steps of a non-finite loss,
        so none reached the weights. Every rank calls it at the same steps (the check is a collective)."""
        state = self.state
        if not state.pending:
            return
        values = torch.stack([t.float() for t, *_ in state.pending]).double().cpu().tolist()
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
        if self.loss_scaler is not None:
            _, _, epoch, step, cfg_id = state.pending[-1 if bad is None else bad]
            _check_finite(bad is None, epoch, step, cfg_id, self.net, self.device)
        last = state.pending[-1][3]
        step_loss = 0.0
        for (_, n, _, step, _), v in zip(state.pending, values):
            state.epoch_loss[0] += v * n
            state.epoch_loss[1] += n
            step_loss += v if step == last else 0.0
        state.last_loss = step_loss / self.accum_steps
        state.pending.clear()

    def _backward(self, loss: torch.Tensor, zero_grad: bool = True, update: bool = True) -> None:
        """Backward of `loss`; with gradient accumulation the first micro-batch of a step zeroes the gradients
        (`zero_grad`) and the last clips and steps (`update`), as timm's need_update."""
        optim, optimizer = self.options.optim, self.optimizer
        parameters = lambda: [p for p in self.model.parameters() if p.requires_grad]
        if zero_grad:
            optimizer.zero_grad(set_to_none=True)
        if self.loss_scaler is not None:
            self.loss_scaler(loss, optimizer, clip_grad=optim.clip_grad, clip_mode=optim.clip_mode,
                             parameters=parameters(), need_update=update)
            return
        loss.backward()
        if not update:
            return
        if optim.clip_grad is not None:
            dispatch_clip_grad(parameters(), optim.clip_grad, mode=optim.clip_mode)
        optimizer.step()

    def use_ema_weights(self) -> None:
        """Copy the EMA's weights into the network (what a result then evaluates and saves); nothing without EMA."""
        if self.ema is not None:
            self.model.load_state_dict(self.ema.state_dict())


class EpochRecords(EpochHooks):
    """What train.py records around each epoch: the validation panel (the EMA's metrics when on), model_best by the
    eval metric (the training loss without a val split), last.pth.tar and summary.csv each epoch, the loggers, the
    progress clock, and the recovery checkpoint inside an epoch and the stop at a Slurm signal (`recovery`)."""

    def __init__(self, trainer: Trainer, val_ds: Any, resume_state: dict | None):
        options = trainer.options
        self.trainer, self.options = trainer, options
        rank, world_size = world()
        self.panel = panel_cfg_ids(options.eval, trainer.model)
        self.val_loader = create_eval_loader(val_ds, options.loader, trainer.data_cfg, rank, world_size) \
            if val_ds is not None else None
        self.by_loss = "loss" in options.eval.eval_metric or self.val_loader is None
        if self.val_loader is None and rank == 0:
            _logger.info("no validation split: model_best.pth.tar is the epoch with the lowest training loss")
        self.saver = CheckpointSaver(options.out_dir, higher_is_better=not self.by_loss,
                                     max_history=options.train.checkpoint_hist)
        self.saver.best = resume_state.get("best_metric") if resume_state is not None else None
        self.clock = RunClock(trainer.epochs, trainer.model.num_configs,
                                              len(val_ds) // world_size if val_ds is not None else 0,
                                              1 + (trainer.ema is not None))
        self.metric: float | None = None  # the epoch's metric for model_best (validate -> end_epoch)
        self.recovery = Recovery(trainer, self.saver, (trainer.args_json, trainer.identity),
                                 options.train.recovery_interval, options.out_dir)

    def start_epoch(self, epoch: int) -> None:
        self.clock.start(epoch)

    def trained(self, epoch: int) -> None:
        train = self.options.train
        self.clock.trained(self.trainer.steps_per_epoch * train.grad_accum_steps * train.batch_size)

    def validate(self, epoch: int, train_metrics: dict) -> tuple[dict, float | None]:
        trainer, ev = self.trainer, self.options.eval
        eval_metrics, metric = {}, train_metrics["loss"] if self.by_loss else None
        if self.val_loader is not None and validates(epoch, ev.val_interval, trainer.epochs):
            size = trainer.data_cfg["input_size"]
            eval_metrics = validate_stitches(trainer.net, self.val_loader, self.panel, self.options, size, epoch,
                                          train_metrics["loss"])
            if trainer.ema is not None:  # as timm: the EMA's metrics are the epoch's (summary, model_best)
                trainer.distribute_bn(trainer.ema)
                eval_metrics = validate_stitches(trainer.ema, self.val_loader, self.panel, self.options, size, epoch,
                                              train_metrics["loss"], " (EMA)")
            metric = eval_metrics[ev.eval_metric] if ev.eval_metric in eval_metrics else eval_metrics["top1"]
            self.clock.validated(len(self.panel))
        self.metric = metric
        return eval_metrics, metric

    def end_epoch(self, epoch: int, train_metrics: dict, eval_metrics: dict, lr: float) -> None:
        trainer, out_dir = self.trainer, self.options.out_dir
        if trainer.rank == 0:
            try:  # timm appends the row in place: a full disk is said as every other write says it
                append_summary(out_dir / "summary.csv", epoch, train_metrics, eval_metrics, lr)
            except OSError as e:
                if is_disk_full(e, out_dir):
                    raise disk_full_error(out_dir, "'summary.csv'", 0) from None
                raise
            state = training_state(trainer.model, trainer.optimizer, epoch, trainer.state.global_step,
                                   trainer.args_json, trainer.identity, trainer.loss_scaler, ema=trainer.ema)
            improved = self.saver.save(state, self.metric)
            self.saver.drop_recovery()
            _logger.info(f"saved {out_dir / LAST}" + (" (best so far)" if improved else ""))
            trainer.loggers.log_epoch(epoch, train_metrics, eval_metrics, lr)
        took = self.clock.finish()
        if trainer.rank == 0:
            _logger.info(self.clock.summary(took))
        self.recovery.stop_after(epoch, trainer.epochs)


# ------------------------------------------------------------------------------------------------------ helpers
def create_model_ema(model: RoutedNet, options: RunOptions, resume_state: dict | None = None) -> ModelEmaV3 | None:
    """--model-ema: timm's ModelEmaV3 of the network, restored from the checkpoint's state_dict_ema (a checkpoint
    without one starts it from the resumed weights, as timm's load_checkpoint(use_ema=True) falls back)."""
    train = options.train
    if not train.model_ema:
        return None
    ema = ModelEmaV3(model, decay=train.model_ema_decay, use_warmup=train.model_ema_warmup)
    if resume_state is not None and "state_dict_ema" in resume_state:
        try:
            ema.module.load_checkpoint_state(resume_state["state_dict_ema"])
        except StateDictMismatch as e:
            raise CheckpointError(f"--resume {options.job.resume!r}: its state_dict_ema does not fit this model "
                                  f"({e})") from None
    elif resume_state is not None:
        _logger.info("--model-ema: the checkpoint has no EMA weights; the EMA starts from the resumed weights")
    return ema


def network_identity(options: RunOptions, stitch_cfg: StitchConfig | None, data_cfg: dict) -> str:
    """The network a run trains, as JSON (anchors, config, input, classes, precision): recorded in every
    checkpoint ("config") and hashed into the results file, so results of another network are never mixed in."""
    ident = {"stitch_config": stitch_cfg.values if stitch_cfg else None,
             # an unlabelled anchor records no "label"
             "anchors": [{k: v for k, v in a.__dict__.items() if k != "label" or v is not None}
                         for a in stitch_cfg.anchors] if stitch_cfg else [options.network.model],
             "input_size": list(data_cfg["input_size"]), "crop_pct": data_cfg["crop_pct"],
             "num_classes": options.network.num_classes, "amp": [options.train.amp, options.train.amp_dtype]}
    return json.dumps(ident, sort_keys=True, default=str)


def prepare(net: RoutedNet, options: RunOptions) -> RoutedNet:
    """Split-BN and sync-BN conversion, device and memory format (before any checkpoint is loaded into it).
    --sync-bn follows timm's rule: a distributed training run only (one process has nothing to synchronise; its
    needs were checked before any work). Units look their modules up by name at run time, so the replacements are
    what runs; parameters keep their identity and names."""
    train = options.train
    if train.split_bn:
        net = convert_splitbn_model(net, max(options.loader.aug_splits, 2))
    if train.sync_bn and not options.job.eval:
        if train.distributed:
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        else:
            _logger.info("--sync-bn: one process, nothing to synchronise; BatchNorm layers unchanged")
    net.to(options.device)
    if train.channels_last:
        net.to(memory_format=torch.channels_last)
    return net


def wants_ls_init(options: RunOptions, stitch_cfg: StitchConfig | None, resume_state: dict | None) -> bool:
    """Fit the stitching layers unless they come from a checkpoint (--resume, --initial-checkpoint) or are off."""
    job = options.job
    if stitch_cfg is None or resume_state is not None or not stitch_cfg.get("ls_init") or job.no_ls_init:
        return False
    if job.initial_checkpoint:
        _logger.info(f"LS init skipped: the stitching layers come from --initial-checkpoint {job.initial_checkpoint}")
        return False
    return True


def freeze(model: RoutedNet, stitch_cfg: StitchConfig | None, freeze_anchors: bool) -> None:
    """--freeze-anchors: only the stitching layers train, the anchors stay in eval mode (no BatchNorm statistics or
    dropout updates, no optimizer state for them). SN-Net's ``fulltune: false``: the stitching layers and the class
    tokens train. A parameter frozen by its own layer (a LoRA layer's W) stays frozen either way."""
    if stitch_cfg is None:
        return
    if freeze_anchors:
        keep = lambda name: name.startswith("stitch_layers.")
        model.freeze_anchors()
    elif not stitch_cfg.get("fulltune"):
        keep = lambda name: name.startswith("stitch_layers.") or "cls" in name
    else:
        return
    for name, p in model.named_parameters():
        if not keep(name):
            p.requires_grad = False


def validates(epoch: int, interval: int, epochs: range) -> bool:
    """Whether epoch `epoch` (0-based) of `epochs` is validated under --val-interval `interval`: every interval-th
    epoch and the last, so a run always ends with its metrics (summary.csv, model_best)."""
    return (epoch + 1) % interval == 0 or epoch + 1 == epochs.stop


def _check_finite(finite: bool, epoch: int, step: int, cfg_id: int, net: nn.Module, device: torch.device) -> None:
    """Stop on a non-finite loss (of stitch `cfg_id` at `step`). Under DDP every rank learns of it in the same call
    (each trains its own stitch), so no rank is left waiting in an all-reduce."""
    mine = torch.tensor([0.0 if finite else 1.0, float(cfg_id), float(step)], device=device)
    if world()[1] > 1:
        flags = [torch.zeros_like(mine) for _ in range(world()[1])]
        dist.all_gather(flags, mine)
    else:
        flags = [mine]
    culprits = [(r, int(f[1]), int(f[2])) for r, f in enumerate(torch.stack(flags).cpu()) if f[0] > 0]
    if culprits:
        rank, cfg, step = culprits[0]
        raise NonFiniteLoss(f"non-finite loss at epoch {epoch}, step {step} on rank {rank} (stitch cfg_id {cfg}: "
                            f"{unwrap(net).describe(cfg)}); lower --lr or set --clip-grad; what was written before "
                            f"(the last good checkpoint, finished runs) is kept")


def _skip_trained(state: TrainState, i: int, skip: int) -> bool:
    """While resuming mid-epoch: True for batches already trained (read, not trained: the loader's randomness is
    replayed), restoring the RNG states the interrupted run had after steps skip-1 and skip."""
    if i > skip:
        return False
    rng = state.restore[0] if i == skip - 1 else state.restore[1] if i == skip else None
    if rng is not None:
        set_rng_state(rng)
    return True


__all__ = ["EpochHooks", "EpochRecords", "NonFiniteLoss", "Trainer", "create_model_ema", "network_identity"]
