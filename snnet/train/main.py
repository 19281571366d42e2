"""train.py: build, least-squares initialise, train (DDP + AMP) and evaluate an SN-Net, the timm way.

    train.py DATA --stitch_config configs/deit_ti_s_b.json [timm flags]        # train, then evaluate every stitch
    train.py DATA --stitch_config ... --eval --resume CKPT                     # evaluate every stitch
    train.py DATA --model vit_tiny_patch16_224 [timm flags]                    # one plain model

This module wires (as DeiT's main.py): parse -> typed options (`RunOptions`, once) -> check -> resolve -> build ->
LS init / resume -> `train_and_evaluate` (a `TrainingRun`: `build`, `fit` with `RunEpochs`, `evaluate`) or
`evaluate_all`. The trainer (optimizer, schedule, EMA, the epoch loop) is trainer.py, shared with stitch-train; the
loops engine.py; the epoch and after-step hooks (recovery checkpoint, stop at a Slurm signal) hooks.py; evaluation
and prediction files evaluator.py; resuming resume.py; the LS init's data ls_data.py; checkpoints
snnet/utils/checkpoint.py.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from timm.data import resolve_data_config
from timm.layers import convert_splitbn_model
from timm.utils import random_seed
from torch import nn

from snnet.data.checks import warn_small_classes_here
from snnet.data.datasets import class_names_of, create_datasets, data_source, num_classes_of
from snnet.data.loaders import create_eval_loader, create_train_loader
from snnet.results.records import EMA_RESULTS_FILE, RESULTS_FILE, ResultsFile, file_sha256, text_sha256
from snnet.stitching.config import StitchConfig
from snnet.stitching.model import RoutedNet
from snnet.train.args import fitted_notes, parse_args
from snnet.train.describe import describe_run, recorded_arguments, to_yaml
from snnet.train.device import adopt_slurm_env, amp_dtype_for, requeued, resolve_device, restart_attempt, unwrap
from snnet.train.evaluator import Evaluation, evaluate_all, prediction_ids, val_panel, validate_panel
from snnet.train.hooks import EpochHooks, Recovery, fault_injection
from snnet.train.loggers import Loggers, check_loggers, create_loggers
from snnet.train.losses import create_loss
from snnet.train.ls_data import InitImages, run_ls_init
from snnet.train.network import build_network, check_train_exclude
from snnet.train.optim import anchor_lr_scale
from snnet.train.options import JobOptions, RunOptions, TrainOptions
from snnet.train.positions import write_stitch_plan
from snnet.train.preempt import STOP, Preempted
from snnet.train.preflight import check_output, check_recipe, check_run
from snnet.train.resolved import ResolvedRun, resolve_run
from snnet.train.resume import append_summary, continue_epoch, fitting_checkpoint, truncate_summary
from snnet.train.sampler import run_sampler
from snnet.train.trainer import Trainer, TrainSetup, create_trainer
from snnet.utils.checkpoint import LAST, RECOVERY, CheckpointSaver, state_sha256, training_state
from snnet.utils.distributed import say_refusal, world
from snnet.utils.errors import SNNetError, one_line
from snnet.utils.fileio import FolderLock, disk_full_error, is_disk_full, write_text_atomic
from snnet.utils.progress import RunClock

_logger = logging.getLogger("snnet")


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    STOP.install()  # train.py installed it before its imports; callers of main() get it here, before any work
    try:
        adopt_slurm_env()  # under srun: RANK, WORLD_SIZE ... from Slurm's variables, before anything reads them
        args, stitch_cfg = parse_args(argv)  # parse (each flag checked as typed)
        start(RunOptions.from_values(vars(args)), stitch_cfg)  # the typed options, once
    except Preempted as e:  # every rank stopped at the same step, the recovery checkpoint written: a clean exit
        if world(launched=True)[0] == 0:
            print(f"preempted: {e}", file=sys.stderr)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        return e.exit_code
    except SNNetError as e:  # every rank meets the same input: one line is enough
        say_refusal(f"error: {one_line(e)}")
        return e.exit_code
    except BaseException:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # a peer crashed or the group broke: leave now. Interpreter teardown (process-group destructors) can
            # block on dead connections and keep torchrun from restarting the workers (--max-restarts)
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
        raise
    # only after a clean run: with a crashed peer, tearing the group down can block forever and keep torchrun
    # from restarting the workers
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


@dataclass
class Run:
    """What every phase of one run reads, typed: the run's options (resolved once, `resolve`) and what was derived
    from them (device, precision, data config, output folder, the network's identity). Nothing below the edge
    reads train.py's namespace."""
    options: RunOptions
    stitch_cfg: StitchConfig | None
    device: torch.device
    amp_dtype: torch.dtype | None
    data_cfg: dict
    out_dir: Path
    config_text: str  # the network's identity (anchors, input, classes, precision), hashed into results
    args_json: str    # the resolved arguments as every checkpoint records them ("args")
    loggers: Loggers | None = None  # --log-tensorboard, --log-wandb (rank 0)
    resolved: ResolvedRun | None = None  # global batch, rates, schedule, folder: the trainer reads them from here

    optim = property(lambda self: self.options.optim)
    schedule = property(lambda self: self.options.schedule)
    loss = property(lambda self: self.options.loss)
    train = property(lambda self: self.options.train)
    eval = property(lambda self: self.options.eval)
    data = property(lambda self: self.options.data)        # which images
    loader = property(lambda self: self.options.loader)    # how they are loaded

    @property
    def resumed_from(self) -> str | None:
        """The checkpoint this run continues (--resume, or found by --auto-resume)."""
        return self.options.job.resume or None

    @property
    def evaluating(self) -> bool:
        """--eval: evaluate every stitch, train nothing."""
        return self.options.job.eval

    @property
    def primary(self) -> bool:
        return world()[0] == 0

    @property
    def evaluation(self) -> Evaluation:
        """What evaluating the network reads (results folder, identity, loader, device, options)."""
        return Evaluation(self.out_dir, self.config_text, self.loader, self.data_cfg, self.device, self.amp_dtype,
                          self.eval, self.data.data_dir)

    @property
    def init_images(self) -> InitImages:
        """Where the LS init's images come from."""
        return InitImages(self.data, self.loader, self.loss, self.data_cfg, self.device, self.amp_dtype,
                          self.train.seed, self.evaluating)


def build_run(options: RunOptions, recorded: Mapping[str, Any], stitch_cfg: StitchConfig | None,
              device: torch.device, data_cfg: dict, out_dir: Path, resolved: ResolvedRun | None = None) -> Run:
    """train.py's edge: the resolved options and the arguments they record (`recorded`, args.yaml's) as the typed
    run."""
    return Run(options, stitch_cfg, device, amp_dtype_for(options.train, device), data_cfg, out_dir,
               network_identity(options, stitch_cfg, data_cfg), json.dumps(dict(recorded), default=str),
               resolved=resolved)


# ------------------------------------------------------------------------------------------------------ building
def network_identity(options: RunOptions, stitch_cfg: StitchConfig | None, data_cfg: dict) -> str:
    ident = {"stitch_config": stitch_cfg.values if stitch_cfg else None,
             # an unlabelled anchor records no "label": the identity (config_sha256) of older runs stays the same
             "anchors": [{k: v for k, v in a.__dict__.items() if k != "label" or v is not None}
                         for a in stitch_cfg.anchors] if stitch_cfg else [options.network.model],
             "input_size": list(data_cfg["input_size"]), "crop_pct": data_cfg["crop_pct"],
             "num_classes": options.network.num_classes, "amp": [options.train.amp, options.train.amp_dtype]}
    return json.dumps(ident, sort_keys=True, default=str)


def resolve(options: RunOptions, stitch_cfg: StitchConfig | None, dataset, placement, out_dir: Path
            ) -> RunOptions:
    """What the run derives from its inputs, resolved once (frozen from then on): the process group's device, the
    number of classes (the data folder's, else the config's), the checkpoint to continue from (--auto-resume,
    always on in a torchrun restart and in a requeued Slurm job: `out_dir`'s newest checkpoint, the recovery
    file when there is one), --dist-bn (off where SyncBatchNorm already synchronises, as timm does), and the data's
    class names (recorded in the checkpoint's arguments, so an export and `snnet serve` name what they predict)."""
    job = options.job
    num_classes = options.network.num_classes
    if num_classes is None:
        num_classes = num_classes_of(dataset) or (stitch_cfg.get("num_classes") if stitch_cfg else None)
    resume = job.resume
    if not resume and not job.eval and (job.auto_resume or restart_attempt() > 0 or requeued() > 0):
        found = [out_dir / name for name in (RECOVERY, LAST) if (out_dir / name).exists()]
        if found:
            resume = str(found[0])
            _logger.info(f"auto-resume: continuing from {resume}")
    synced = options.train.sync_bn and placement.distributed and not job.eval
    return options.replaced(device=str(placement.device), distributed=placement.distributed,
                            num_classes=num_classes, resume=resume,
                            dist_bn="" if synced else options.train.dist_bn, class_names=class_names_of(dataset))


# ------------------------------------------------------------------------------------------------------ the run
def start(options: RunOptions, stitch_cfg: StitchConfig | None) -> None:
    """Check, then execute the run under the output folder's lock (--dry-run: print the resolved run)."""
    rank, world_size = world(launched=True)
    # the global batch, rates, schedule and folder, resolved once: the checks, the dry run and the trainer read them
    resolved = resolve_run(options, world_size)
    if options.job.dry_run:  # before any process group, weight or image: rank 0 prints the resolved run
        # the checks that need no data, device or file
        check_recipe(options, stitch_cfg, world_size, resolved=resolved)
        warn_small_classes_here(options.data)  # the data's one warning, when the folder is on this machine
        if rank == 0:
            device_type = (options.train.device or ("cuda" if torch.cuda.is_available() else "cpu")).split(":")[0]
            print(to_yaml(describe_run(options, stitch_cfg, world_size, device_type, resolved=resolved)), end="")
        return
    out_dir = resolved.out_dir  # named once: a generated name holds the time of day
    check_output(out_dir)  # it can be made, and no other run holds it
    # one run per output folder, locked before anything else is done (a run started at the same moment is refused
    # here, not after its checks and LS init): rank 0 holds the lock (torchrun's other ranks write into rank 0's
    # folder); the kernel releases it when the process dies, so a crashed run never leaves it stuck, and a refused
    # run's release removes the folder it made
    with FolderLock(out_dir) if rank == 0 else nullcontext():
        # check: every input, before any weight or image (the anchors' checkpoints by their keys and shapes)
        check_run(options, stitch_cfg, world_size, anchor_checkpoints=True, out_dir=out_dir, resolved=resolved)
        check_loggers(options.logging)
        if rank == 0:
            for note in fitted_notes():  # the defaults parsing fitted to this run (a short run, a small machine)
                _logger.info(note)
        _execute(options, stitch_cfg, resolved)


def _execute(options: RunOptions, stitch_cfg: StitchConfig | None, resolved: ResolvedRun) -> None:
    job, out_dir = options.job, resolved.out_dir
    placement = resolve_device(options.train.device, job.dist_backend, job.dist_url)  # the process group (timm's)
    rank, world_size, device = placement.rank, placement.world_size, placement.device
    if world_size != resolved.world_size:  # the launch's environment said otherwise: the process group counts
        resolved = resolve_run(options, world_size, out_dir)
    # the network's random parts (random anchors, stitching layers) are the same on every rank
    random_seed(options.train.seed, 0)
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    train_ds, val_ds = create_datasets(options.data, need_train=not job.eval)
    options = resolve(options, stitch_cfg, train_ds or val_ds, placement, out_dir)  # resolve: frozen from here
    job = options.job
    recorded = recorded_arguments(options, distributed=placement.distributed, rank=rank, world_size=world_size,
                                  local_rank=placement.local_rank, class_names=options.network.class_names)
    net, stitch_cfg = _build(options, stitch_cfg, train_ds, device)  # build: positions explicit from here
    data_cfg = resolve_data_config(options.input.data_config_args(), model=net)
    run = build_run(options, recorded, stitch_cfg, device, data_cfg, out_dir, resolved)
    if run.primary and stitch_cfg is not None:  # explicit or selected "positions": <output>/stitch_plan.json
        write_stitch_plan(unwrap(net), run.out_dir)
    resume = job.resume
    resume_state = fitting_checkpoint(net, resume) if resume else None
    if job.initial_checkpoint:
        unwrap(net).load_checkpoint_state(fitting_checkpoint(net, job.initial_checkpoint)["state_dict"])
    sampler = None
    if not job.eval:
        val_panel(run.eval, unwrap(net))  # refused now, not after the LS init
        sampler = _sampler(unwrap(net), run, rank)  # the sampler's type and options (ROS buckets), too
    eval_hash = ""
    prediction_ids(run.eval.save_predictions, unwrap(net))  # a bad cfg_id refused before any work
    if job.eval:  # what is evaluated, and the results file it would continue: refused now, not after the LS init
        # no checkpoint: the network's own weights (anchors as built; the LS init is a function of them, the seed and
        # the data) are its identity, so a cached evaluation of other anchor weights is never taken for this one
        eval_hash = file_sha256(resume) if resume else text_sha256(
            f"init:{options.train.seed}:{run.config_text}:{state_sha256(unwrap(net).checkpoint_state())}")
        if run.primary:
            ResultsFile(out_dir / RESULTS_FILE, eval_hash, text_sha256(run.config_text),
                        data_source(val_ds) if val_ds is not None else None).completed()
    _logger.info("data: " + ", ".join(f"{k} {v}" for k, v in data_cfg.items()))  # after every check: no banner
    if run.primary and not job.eval:  # the resolved run, after every check and before any work (LS init, training)
        write_text_atomic(out_dir / "args.yaml", to_yaml(describe_run(options, stitch_cfg, world_size, device.type,
                                                                      net=unwrap(net), recorded=recorded,
                                                                      resolved=resolved)))
    run.loggers = create_loggers(replace(options.logging, run_config=recorded), run.out_dir, run.primary)
    if _wants_ls_init(options.job, stitch_cfg, resume_state):
        assert stitch_cfg is not None  # only an SN-Net has stitching layers to fit
        run_ls_init(net, train_ds if train_ds is not None else val_ds, stitch_cfg, run.init_images,
                      job.stitch_init_bs, job.ls_mode)
    if resume_state is not None:
        unwrap(net).load_checkpoint_state(resume_state["state_dict"])  # read once, fit checked above
    if job.eval:
        evaluate_all(net, val_ds, run.evaluation, eval_hash)
        run.loggers.log_final_front(run.out_dir / RESULTS_FILE, run.out_dir, 0)
        run.loggers.close()
        return
    assert sampler is not None
    train_and_evaluate(net, train_ds, val_ds, run, resume_state, sampler)


def _build(options: RunOptions, stitch_cfg: StitchConfig | None, train_ds, device: torch.device
           ) -> tuple[RoutedNet, StitchConfig | None]:
    """The network (positions chosen from data when the config asks), seeded per rank from then on, converted and
    on its device."""
    built, stitch_cfg = build_network(options.network_to_build(), stitch_cfg, train_ds)
    assert built is not None  # None only for structure_only
    check_train_exclude(built, stitch_cfg)
    rank = world()[0]
    if rank != 0:  # then each rank its own stream (augmentation, dropout); rank 0's goes on unchanged
        random_seed(options.train.seed, rank)
    return _prepare(built, options.train, device, options.job.eval, options.loader.aug_splits), stitch_cfg


def _prepare(net: RoutedNet, train: TrainOptions, device: torch.device, evaluating: bool = False,
             aug_splits: int = 0) -> RoutedNet:
    """Split-BN / sync-BN conversion, device and memory format (before any checkpoint is loaded into it)."""
    if train.split_bn:
        net = convert_splitbn_model(net, max(aug_splits, 2))
    net = convert_sync_bn(net, train, device, evaluating)
    net.to(device)
    if train.channels_last:
        net.to(memory_format=torch.channels_last)
    return net


def _wants_ls_init(job: JobOptions, stitch_cfg: StitchConfig | None, resume_state: dict | None) -> bool:
    """Fit the stitching layers unless they come from a checkpoint (--resume, --initial-checkpoint) or are off."""
    if stitch_cfg is None or resume_state is not None or not stitch_cfg.get("ls_init") or job.no_ls_init:
        return False
    if job.initial_checkpoint:
        _logger.info(f"LS init skipped: the stitching layers come from --initial-checkpoint {job.initial_checkpoint}")
        return False
    return True


def convert_sync_bn(net: RoutedNet, train: TrainOptions, device: torch.device, evaluating: bool = False
                    ) -> RoutedNet:
    """--sync-bn: torch SyncBatchNorm in place of every BatchNorm of a distributed training run (timm's rule: one
    process has nothing to synchronise; its needs were checked before any work, `preflight.check_sync_bn`). Units
    look their modules up by name at run time, so the replacements are what runs; parameters keep their identity and
    names."""
    if not train.sync_bn or evaluating:
        return net
    if not train.distributed:
        _logger.info("--sync-bn: one process, nothing to synchronise; BatchNorm layers unchanged")
        return net
    return nn.SyncBatchNorm.convert_sync_batchnorm(net)


# ------------------------------------------------------------------------------------------------------ training
def _freeze(model: RoutedNet, stitch_cfg: StitchConfig | None, freeze_anchors: bool) -> None:
    """--freeze-anchors: only the stitching layers train, the anchors stay in eval mode (no BatchNorm statistics or
    dropout updates, no optimizer state for them). SN-Net's ``fulltune: false``: the stitching layers and the class
    tokens train. A parameter frozen by its own layer (a LoRA layer's W) stays frozen either way. (A plain --model
    with --freeze-anchors never trains: parsing refuses it.)"""
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


def _sampler(net: RoutedNet, run: Run, rank: int):
    # frozen anchors: an anchor's own route has nothing to train, so it is not drawn
    return run_sampler(net, run.stitch_cfg, run.train.seed, rank, sync=run.train.sample_sync,
                       freeze_anchors=run.train.freeze_anchors)


def _setup_training(net: RoutedNet, train_ds, run: Run, resume_state: dict | None, sampler) -> Trainer:
    """The trainer (optimizer, scaler, schedule, EMA, compile, DDP) on the training loader, with the run's loss and
    sampler, resumed where the checkpoint left off."""
    train, world_size = run.train, world()[1]
    _freeze(net, run.stitch_cfg, train.freeze_anchors)
    loader = create_train_loader(train_ds, run.loader, run.data_cfg, run.device)
    loss_fn, mixup_fn = create_loss(run.loss, run.device)
    catching = STOP.installed  # under Slurm: SIGUSR1/SIGTERM stop the run at an agreed step, with a recovery file
    setup = TrainSetup(run.device, run.amp_dtype, sampler, mixup_fn, resume_state, run.data_cfg["input_size"],
                       after_step=[fault_injection], snapshot_rng=train.recovery_interval > 0 or catching,
                       resolved=run.resolved)
    trainer = create_trainer(net, loader, loss_fn, run.options, setup)
    accum = trainer.ctx.settings.accum_steps
    continue_epoch(trainer.state, resume_state, accum)
    if run.primary:
        _logger.info(f"output: {run.out_dir}; {net.num_configs} network(s); lr {trainer.lr:.3e} (anchors "
                     f"x{anchor_lr_scale(run.optim)}); {trainer.steps_per_epoch} steps/epoch"
                     + (f" of {accum} batches" if accum > 1 else "")
                     + f"; {world_size} process(es); amp {run.amp_dtype}"
                     + (f"; torch.compile ({train.torchcompile}) of {trainer.compiled} block module(s)"
                        if trainer.compiled else "")
                     + ("; gradient checkpointing" if train.grad_checkpointing else "")
                     + (f"; EMA decay {train.model_ema_decay}" if trainer.ema is not None else ""))
    return trainer


class RunEpochs(EpochHooks):
    """train.py's epochs around the trainer's: the validation panel (the EMA's metrics when on), model_best by the
    eval metric (the training loss without a val split), checkpoints and summary.csv each epoch, the loggers, the
    progress clock, the recovery checkpoint inside an epoch and the stop at a Slurm signal (`recovery`, whose
    after-step hooks `TrainingRun.build` installs), the run stopping once the epoch is saved."""

    def __init__(self, trainer: Trainer, run: Run, val_ds, resume_state: dict | None):
        self.trainer, self.run = trainer, run
        rank, world_size = world()
        self.panel = val_panel(run.eval, trainer.model)
        self.val_loader = create_eval_loader(val_ds, run.loader, run.data_cfg, rank, world_size) \
            if val_ds is not None else None
        self.by_loss = "loss" in run.eval.eval_metric or self.val_loader is None
        if self.val_loader is None and run.primary:
            _logger.info("no validation split: model_best.pth.tar is the epoch with the lowest training loss")
        self.saver = CheckpointSaver(run.out_dir, higher_is_better=not self.by_loss,
                                     max_history=run.train.checkpoint_hist)
        self.saver.best = resume_state.get("best_metric") if resume_state is not None else None
        self.loggers = run.loggers or Loggers()
        self.clock = trainer.ctx.clock = RunClock(trainer.epochs, trainer.model.num_configs,
                                                  len(val_ds) // world_size if val_ds is not None else 0,
                                                  1 + (trainer.ema is not None))
        self.metric: float | None = None  # the epoch's metric for model_best (validate -> end_epoch)
        self.recovery = Recovery(trainer.model, trainer.optimizer, trainer.ctx, self.saver,
                                 (run.args_json, run.config_text), run.train.recovery_interval,
                                 trainer.steps_per_epoch, run.out_dir)

    def start_epoch(self, epoch: int) -> None:
        self.clock.start(epoch)

    def trained(self, epoch: int) -> None:
        train = self.run.train
        self.clock.trained(self.trainer.steps_per_epoch * train.grad_accum_steps * train.batch_size)

    def validate(self, epoch: int, train_metrics: dict) -> tuple[dict, float | None]:
        trainer, ev, evaluation = self.trainer, self.run.eval, self.run.evaluation
        eval_metrics, metric = {}, train_metrics["loss"] if self.by_loss else None
        if self.val_loader is not None and validates(epoch, ev.val_interval, trainer.epochs):
            eval_metrics = validate_panel(trainer.net, self.val_loader, self.panel, evaluation, epoch,
                                          train_metrics["loss"])
            if trainer.ema is not None:  # as timm: the EMA's metrics are the epoch's (summary, model_best)
                trainer.distribute_bn(trainer.ema)
                eval_metrics = validate_panel(trainer.ema, self.val_loader, self.panel, evaluation, epoch,
                                              train_metrics["loss"], " (EMA)")
            metric = eval_metrics[ev.eval_metric] if ev.eval_metric in eval_metrics else eval_metrics["top1"]
            self.clock.validated(len(self.panel))
        self.metric = metric
        return eval_metrics, metric

    def end_epoch(self, epoch: int, train_metrics: dict, eval_metrics: dict, lr: float) -> None:
        run, trainer = self.run, self.trainer
        if run.primary:
            try:  # timm appends the row in place: a full disk is said as every other write says it
                append_summary(run.out_dir / "summary.csv", epoch, train_metrics, eval_metrics, lr)
            except OSError as e:
                if is_disk_full(e, run.out_dir):
                    raise disk_full_error(run.out_dir, "'summary.csv'", 0) from None
                raise
            state = training_state(trainer.model, trainer.optimizer, epoch, trainer.state.global_step, run.args_json,
                                   run.config_text, trainer.ctx.loss_scaler, ema=trainer.ema)
            improved = self.saver.save(state, self.metric)
            self.saver.drop_recovery()
            _logger.info(f"saved {run.out_dir / LAST}" + (" (best so far)" if improved else ""))
            self.loggers.log_epoch(epoch, train_metrics, eval_metrics, lr)
        took = self.clock.finish()
        if run.primary:
            _logger.info(self.clock.summary(took))
        self.recovery.stop_after(epoch, trainer.epochs)


def validates(epoch: int, interval: int, epochs: range) -> bool:
    """Whether epoch `epoch` (0-based) of `epochs` is validated under --val-interval `interval`: every interval-th
    epoch and the last, so a run always ends with its metrics (summary.csv, model_best)."""
    return (epoch + 1) % interval == 0 or epoch + 1 == epochs.stop


class TrainingRun:
    """train.py's training, in torchtitan's shape: `build` (the trainer, its epoch hooks `RunEpochs`, the recovery
    and stop hooks after every step), `fit` (the epochs), `evaluate` (every stitch of the trained network, and of
    its EMA when on)."""

    def __init__(self, trainer: Trainer, epochs: RunEpochs, run: Run, val_ds):
        self.trainer, self.epochs, self.run, self.val_ds = trainer, epochs, run, val_ds

    @classmethod
    def build(cls, net: RoutedNet, train_ds, val_ds, run: Run, resume_state: dict | None, sampler) -> TrainingRun:
        """The trainer on `net` (resumed where `resume_state` left off), train.py's epoch hooks, and the recovery
        checkpoint and stop at a Slurm signal after every optimizer step."""
        trainer = _setup_training(unwrap(net), train_ds, run, resume_state, sampler)
        epochs = RunEpochs(trainer, run, val_ds, resume_state)
        epochs.recovery.install()
        return cls(trainer, epochs, run, val_ds)

    def fit(self) -> None:
        """The epochs (summary.csv's rows of epochs this run redoes dropped first)."""
        if self.run.primary:
            truncate_summary(self.run.out_dir / "summary.csv", self.trainer.epochs.start)
        self.trainer.fit(self.epochs)

    def evaluate(self) -> None:
        """Every stitch on the validation split (none without one), then the EMA's; the final front logged."""
        trainer, run, val_ds = self.trainer, self.run, self.val_ds
        if val_ds is None:
            return
        ckpt_hash = file_sha256(run.out_dir / LAST) if run.primary else ""
        evaluate_all(trainer.net, val_ds, run.evaluation, ckpt_hash)
        if trainer.ema is not None:
            evaluate_all(trainer.ema, val_ds, run.evaluation, ckpt_hash, EMA_RESULTS_FILE)
        self.epochs.loggers.log_final_front(run.out_dir / RESULTS_FILE, run.out_dir, trainer.epochs.stop)


def train_and_evaluate(net: RoutedNet, train_ds, val_ds, run: Run, resume_state: dict | None, sampler) -> None:
    """Train epoch by epoch (`RunEpochs`: validation panel, checkpoints, summary.csv), then evaluate every
    stitch."""
    training = TrainingRun.build(net, train_ds, val_ds, run, resume_state, sampler)
    training.fit()
    training.evaluate()
    training.epochs.loggers.close()


if __name__ == "__main__":
    sys.exit(main())
