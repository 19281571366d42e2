"""train.py: build, least-squares initialise, train (DDP + AMP) and evaluate an SN-Net, the timm way.

    train.py DATA --stitch_config configs/deit_ti_s_b.json [timm flags]        # train, then evaluate every stitch
    train.py DATA --stitch_config ... --eval --resume CKPT                     # evaluate every stitch
    train.py DATA --model vit_tiny_patch16_224 [timm flags]                    # one plain model

This module wires (as DeiT's main.py): arguments -> data -> network -> LS init / resume -> `fit` or `evaluate_all`.
The loops are in engine.py, optimizer and schedule in optim.py, losses in losses.py, checkpoints in checkpoint.py,
the results file in results.py.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from snnet.core.checkpoint import (
    LAST,
    RECOVERY,
    CheckpointError,
    CheckpointSaver,
    StateDictMismatch,
    fit_report,
    image_size_hint,
    json_field,
    load_checkpoint,
    state_sha256,
    training_state,
)
from snnet.core.config import ConfigError, StitchConfig
from snnet.core.cost import cost_table
from snnet.core.distributed import world
from snnet.core.errors import SNNetError, one_line
from snnet.core.fileio import FolderLock, disk_full_error, is_disk_full, write_text_atomic
from snnet.core.model import RoutedNet
from snnet.core.progress import RunClock
from snnet.core.steps import UnitStep
from snnet.data.checks import DataError
from snnet.data.datasets import create_datasets, data_source, num_classes_of
from snnet.data.loaders import create_eval_loader, create_train_loader
from snnet.data.ls_images import clean_images
from snnet.data.options import DataOptions, LoaderOptions
from snnet.results.records import EMA_RESULTS_FILE, RESULTS_FILE, ResultsFile, file_sha256, stitch_record, text_sha256
from snnet.train.args import UsageError, freeze, options_from, parse_args
from snnet.train.device import adopt_slurm_env, amp_dtype_for, requeued, resolve_device, restart_attempt, unwrap
from snnet.train.engine import PerImage, TrainContext, default_val_panel, evaluate_stitches, train_one_epoch
from snnet.train.loggers import Loggers, check_loggers, create_loggers
from snnet.train.losses import create_loss
from snnet.train.network import build_network, check_train_exclude
from snnet.train.optim import anchor_lr_scale, create_optimizer, create_scheduler, epoch_offset, resolve_lrs
from snnet.train.positions import write_stitch_plan
from snnet.train.preempt import STOP, Preempted
from snnet.train.preflight import check_recipe, check_run, output_dir
from snnet.train.resolve import describe_run, launch_world_size, logger_options, network_options, to_yaml
from snnet.train.sampler import create_sampler, seed_epoch

_logger = logging.getLogger("snnet")


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        adopt_slurm_env()  # under srun: RANK, WORLD_SIZE ... from Slurm's variables, before anything reads them
        args, stitch_cfg = parse_args(argv)
        run(args, stitch_cfg)
    except Preempted as e:  # every rank stopped at the same step, the recovery checkpoint written: a clean exit
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"preempted: {e}", file=sys.stderr)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        return e.exit_code
    except SNNetError as e:
        if int(os.environ.get("RANK", "0")) == 0:  # every rank meets the same input: one line is enough
            print(f"error: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    except BaseException:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # a peer crashed or the group broke: leave now. Interpreter teardown (process-group destructors) can
            # block on dead connections and keep torchrun from restarting the workers (--max-restarts)
            import traceback
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
    """What every phase of one run reads: the resolved arguments and what was derived from them once."""
    args: argparse.Namespace
    stitch_cfg: StitchConfig | None
    device: torch.device
    amp_dtype: torch.dtype | None
    data_cfg: dict
    out_dir: Path
    config_text: str  # the network's identity (anchors, input, classes, precision), hashed into results
    loggers: Loggers | None = None  # --log-tensorboard, --log-wandb (rank 0)

    @property
    def primary(self) -> bool:
        return world()[0] == 0

    @property
    def data(self) -> DataOptions:
        """Which images (the data layer's options, from the resolved arguments)."""
        return options_from(DataOptions, self.args)

    @property
    def loader(self) -> LoaderOptions:
        """How they are loaded (batch sizes, workers, augmentation)."""
        return options_from(LoaderOptions, self.args)


# ------------------------------------------------------------------------------------------------------ building
def _config_text(args: argparse.Namespace, stitch_cfg: StitchConfig | None, data_cfg: dict) -> str:
    ident = {"stitch_config": stitch_cfg.values if stitch_cfg else None,
             # an unlabelled anchor records no "label": the identity (config_sha256) of older runs stays the same
             "anchors": [{k: v for k, v in a.__dict__.items() if k != "label" or v is not None}
                         for a in stitch_cfg.anchors] if stitch_cfg else [args.model],
             "input_size": list(data_cfg["input_size"]), "crop_pct": data_cfg["crop_pct"],
             "num_classes": args.num_classes, "amp": [args.amp, args.amp_dtype]}
    return json.dumps(ident, sort_keys=True, default=str)


def _resolve(args: argparse.Namespace, stitch_cfg: StitchConfig | None, dataset) -> argparse.Namespace:
    """What the run derives from its inputs, resolved once and frozen with them: the number of classes (the data
    folder's, else the config's), the checkpoint to continue from (--auto-resume, always on in a torchrun restart
    and in a requeued Slurm job: the run folder's newest checkpoint, the recovery file when there is one), and
    --dist-bn (off where SyncBatchNorm already synchronises, as timm does)."""
    num_classes = args.num_classes
    if num_classes is None:
        num_classes = num_classes_of(dataset) or (stitch_cfg.get("num_classes") if stitch_cfg else None)
    resume = args.resume
    if not resume and not args.eval and (args.auto_resume or restart_attempt() > 0 or requeued() > 0):
        out_dir = output_dir(args)
        found = [out_dir / name for name in (RECOVERY, LAST) if (out_dir / name).exists()]
        if found:
            resume = str(found[0])
            _logger.info(f"auto-resume: continuing from {resume}")
    synced = args.sync_bn and args.distributed and not args.eval
    return freeze(args, num_classes=num_classes, resume=resume, dist_bn="" if synced else args.dist_bn)


def _snnet_init_batch(run: Run, images_from, count: int) -> torch.Tensor:
    """SN-Net's LS-init data (docs/snnet_compat.md, C12): this process's first batch of `count` images of a training
    loader built like training's (full augmentation), mixed up when mixup/cutmix are on."""
    from snnet.train.losses import create_mixup
    args, train_ds, reason = run.args, images_from, ""
    if args.eval:  # evaluation runs do not load the training split
        try:
            train_ds = create_datasets(run.data, need_train=True)[0]
        except DataError as e:
            train_ds, reason = None, f" ({one_line(e)})"
    if train_ds is None:
        raise DataError(f"--ls-mode snnet fits on a training batch, as SN-Net did, and needs the training split"
                        f"{reason}; add it, or use --ls-mode joint")
    mixup_fn = create_mixup(args)
    if mixup_fn is not None and count % 2:
        raise DataError(f"--ls-mode snnet with mixup/cutmix needs an even init batch, got stitch_init_bs {count}")
    loader = create_train_loader(train_ds, run.loader.with_batch_size(count), run.data_cfg, run.device)
    batch = next(iter(loader), None)
    if batch is None:  # the training loader drops incomplete batches
        raise DataError(f"--ls-mode snnet needs {count} training images per process (stitch_init_bs) for its batch; "
                        f"lower --stitch-init-bs, or use --ls-mode joint")
    images, targets = batch[0].to(run.device), batch[1].to(run.device)
    return mixup_fn(images, targets)[0] if mixup_fn is not None else images


def snnet_version(stitch_cfg: StitchConfig | None) -> int:
    """Whose init ``--ls-mode snnet`` reproduces: SN-Netv2's for its two-way plan, else SN-Net's."""
    return 2 if stitch_cfg is not None and stitch_cfg.get("stitch_plan") == "two_way" else 1


def ls_initialise(net: RoutedNet, run: Run, images_from) -> None:
    """Least-squares init of the stitching layers (see ls_init.py) on clean images, or for ``--ls-mode snnet`` on
    SN-Net's training batch, with a log line."""
    from snnet.core.ls_init import ls_init
    args, rank, world_size = run.args, *world()
    count = args.stitch_init_bs or run.stitch_cfg.get("stitch_init_bs")
    mode = args.ls_mode or run.stitch_cfg.get("ls_mode")
    t0 = time.perf_counter()
    if mode == "snnet":
        images, what = [_snnet_init_batch(run, images_from, count)], f"{count} augmented training images per process"
    else:
        images = clean_images(images_from, run.data_cfg, count, args.seed, rank, world_size)
        what = f"{images.count} clean images" + (f" ({count} asked)" if images.count < count else "")
    version = snnet_version(run.stitch_cfg)
    if mode == "snnet" and version == 2:  # SN-Netv2's fit: eval mode, under the run's autocast (C36)
        reports = ls_init(net, images, mode=mode, snnet_version=2, amp_dtype=run.amp_dtype)
        what += f", SN-Netv2's fit (eval mode, autocast {run.amp_dtype})"
    else:
        reports = ls_init(net, images, mode=mode)
    if reports:
        errs = [r.rel_error for r in reports]
        _logger.info(f"LS init: {len(reports)} stitching layers fitted on {what} ({mode}) in "
                     f"{time.perf_counter() - t0:.1f}s; relative fit error mean {sum(errs) / len(errs):.4f} "
                     f"max {max(errs):.4f}")


# ------------------------------------------------------------------------------------------------------ the run
def run(args: argparse.Namespace, stitch_cfg: StitchConfig | None) -> None:
    if args.dry_run:  # before any process group, weight or image: rank 0 prints the resolved run
        check_recipe(args, stitch_cfg, launch_world_size())  # the checks that need no data, device or file here
        if int(os.environ.get("RANK", "0")) == 0:
            device_type = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).split(":")[0]
            print(to_yaml(describe_run(args, stitch_cfg, launch_world_size(), device_type)), end="")
        return
    check_run(args, stitch_cfg, launch_world_size())  # every input, before any weight or image
    check_loggers(logger_options(args))
    out_dir = output_dir(args)  # once: a generated name holds the time of day
    # one run per output folder: rank 0 holds the lock (torchrun's other ranks write into rank 0's folder); the
    # kernel releases it when the process dies, so a crashed run never leaves it stuck
    with FolderLock(out_dir) if int(os.environ.get("RANK", "0")) == 0 else nullcontext():
        _run(args, stitch_cfg, out_dir)


def _run(args: argparse.Namespace, stitch_cfg: StitchConfig | None, out_dir: Path) -> None:
    from timm.data import resolve_data_config
    from timm.utils import random_seed

    device = resolve_device(args)  # the process group (timm's init_distributed_device sets args' rank and world)
    rank, world_size = world()
    random_seed(args.seed, 0)  # the network's random parts (random anchors, stitching layers) are the same on every rank
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    train_ds, val_ds = create_datasets(options_from(DataOptions, args), need_train=not args.eval)
    args = _resolve(args, stitch_cfg, train_ds or val_ds)  # frozen from here: nothing changes args mid-run
    net, stitch_cfg = build_network(network_options(args), stitch_cfg, train_ds)  # positions explicit from here
    check_train_exclude(net, stitch_cfg)
    if rank != 0:  # then each rank its own stream (augmentation, dropout); rank 0's goes on unchanged
        random_seed(args.seed, rank)
    data_cfg = resolve_data_config(vars(args), model=net)
    net = _prepare(net, args, device)
    run_ = Run(args, stitch_cfg, device, amp_dtype_for(args, device), data_cfg, out_dir,
               _config_text(args, stitch_cfg, data_cfg))
    if run_.primary and stitch_cfg is not None:  # explicit or selected "positions": <output>/stitch_plan.json
        write_stitch_plan(unwrap(net), run_.out_dir)
    resume = args.resume
    resume_state = _fitting_checkpoint(net, resume) if resume else None
    if args.initial_checkpoint:
        unwrap(net).load_checkpoint_state(_fitting_checkpoint(net, args.initial_checkpoint)["state_dict"])
    if not args.eval:
        _val_panel(args, net)  # refused now, not after the LS init
        _sampler(unwrap(net), run_, rank)  # the sampler's type and options (ROS buckets from the cost table), too
    eval_hash = None
    _prediction_ids(getattr(args, "save_predictions", "none"), unwrap(net))  # a bad cfg_id refused before any work
    if args.eval:  # what is evaluated, and the results file it would continue: refused now, not after the LS init
        # no checkpoint: the network's own weights (anchors as built; the LS init is a function of them, the seed and
        # the data) are its identity, so a cached evaluation of other anchor weights is never taken for this one
        eval_hash = file_sha256(resume) if resume else text_sha256(
            f"init:{args.seed}:{run_.config_text}:{state_sha256(unwrap(net).checkpoint_state())}")
        if run_.primary:
            ResultsFile(out_dir / RESULTS_FILE, eval_hash, text_sha256(run_.config_text),
                        data_source(val_ds) if val_ds is not None else None).completed()
    _logger.info("data: " + ", ".join(f"{k} {v}" for k, v in data_cfg.items()))  # after every check: no banner
    if run_.primary and not args.eval:  # the resolved run, after every check and before any work (LS init, training)
        write_text_atomic(out_dir / "args.yaml", to_yaml(describe_run(args, stitch_cfg, world_size, device.type,
                                                                      net=unwrap(net))))
    run_.loggers = create_loggers(logger_options(args), run_.out_dir, run_.primary)
    if _wants_ls_init(args, stitch_cfg, resume_state):
        ls_initialise(net, run_, train_ds if train_ds is not None else val_ds)
    if resume_state is not None:
        unwrap(net).load_checkpoint_state(resume_state["state_dict"])  # read once, fit checked above
    if args.eval:
        evaluate_all(net, val_ds, run_, eval_hash)
        run_.loggers.log_final_front(run_.out_dir / RESULTS_FILE, run_.out_dir, 0)
        run_.loggers.close()
        return
    fit(net, train_ds, val_ds, run_, resume_state)


def _prepare(net: RoutedNet, args: argparse.Namespace, device: torch.device) -> RoutedNet:
    """Split-BN / sync-BN conversion, device and memory format (before any checkpoint is loaded into it)."""
    if args.split_bn:
        from timm.layers import convert_splitbn_model
        net = convert_splitbn_model(net, max(args.aug_splits, 2))
    net = convert_sync_bn(net, args, device)
    net.to(device)
    if args.channels_last:
        net.to(memory_format=torch.channels_last)
    return net


def _fitting_checkpoint(net: RoutedNet, path: str) -> dict:
    """A checkpoint to start from (--resume, --initial-checkpoint), read once and refused now if it does not fit the
    network (before any image is read)."""
    state = load_checkpoint(path)
    report = fit_report(unwrap(net).checkpoint_state(), state["state_dict"])
    if report:
        hint = image_size_hint(unwrap(net), state["state_dict"])  # a wrong --img-size: name the right one
        raise CheckpointError(f"checkpoint {path!r} does not fit this model ({hint + '; ' if hint else ''}{report}); "
                              f"it was made with another stitch config, model, image size or --num-classes: pass "
                              f"the same ones")
    return state


def _wants_ls_init(args: argparse.Namespace, stitch_cfg: StitchConfig | None, resume_state: dict | None) -> bool:
    """Fit the stitching layers unless they come from a checkpoint (--resume, --initial-checkpoint) or are off."""
    if stitch_cfg is None or resume_state is not None or not stitch_cfg.get("ls_init") or args.no_ls_init:
        return False
    if args.initial_checkpoint:
        _logger.info(f"LS init skipped: the stitching layers come from --initial-checkpoint {args.initial_checkpoint}")
        return False
    return True


def convert_sync_bn(net: RoutedNet, args: argparse.Namespace, device: torch.device) -> RoutedNet:
    """--sync-bn: torch SyncBatchNorm in place of every BatchNorm of a distributed training run (timm's rule: one
    process has nothing to synchronise). Units look their modules up by name at run time, so the replacements are
    what runs; parameters keep their identity and names."""
    if not args.sync_bn or args.eval:
        return net
    if not args.distributed:
        _logger.info("--sync-bn: one process, nothing to synchronise; BatchNorm layers unchanged")
        return net
    if net.num_configs > 1 and not args.sample_sync:
        raise UsageError("--sync-bn needs --sample-sync: SyncBatchNorm communicates inside every BatchNorm layer, so "
                         "all processes must train the same stitch each step; add --sample-sync")
    if device.type != "cuda":
        raise UsageError(f"--sync-bn needs CUDA devices: torch's SyncBatchNorm does not run on {device.type}; drop "
                         f"--sync-bn (--dist-bn reduce averages BatchNorm statistics after each epoch instead)")
    return nn.SyncBatchNorm.convert_sync_batchnorm(net)


def evaluate_all(net: RoutedNet, val_ds, run: Run, ckpt_hash: str, results_name: str = RESULTS_FILE) -> dict:
    """Every stitch on the validation set; one JSON line per stitch in <out_dir>/<results_name> (stitches_res.txt,
    or stitches_res_ema.txt for the --model-ema weights)."""
    args, (rank, world_size) = run.args, world()
    if val_ds is None:
        raise DataError(f"no validation split in {args.data_dir!r} to evaluate the stitches on")
    model = unwrap(net)
    results = ResultsFile(run.out_dir / results_name, ckpt_hash, text_sha256(run.config_text), data_source(val_ds))
    done = {}
    if rank == 0:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        done = results.completed()
    chosen = _prediction_ids(getattr(args, "save_predictions", "none"), model)
    redo = _predictions_missing(results.path, done, chosen) if rank == 0 else []
    if world_size > 1:  # every rank evaluates the same remaining stitches
        box = [sorted(done), redo]
        torch.distributed.broadcast_object_list(box, src=0)
        done, redo = dict.fromkeys(box[0]), box[1]
    todo = sorted({c for c in range(model.num_configs) if c not in done} | set(redo))
    if not todo:
        _logger.info(f"all {model.num_configs} stitches already evaluated in {results.path}")
        return done
    table = cost_table(model, tuple(run.data_cfg["input_size"][1:]), run.data_cfg["input_size"][0])
    _logger.info(f"evaluating {len(todo)} stitch(es) ({len(done)} already in {results.path}"
                 + (f"; {len(redo)} again for their per-image predictions" if redo else "") + f") on "
                 f"{len(val_ds)} images, {world_size} process(es)")
    loader = create_eval_loader(val_ds, run.loader, run.data_cfg, rank, world_size)
    per_image = PerImage([c for c in chosen if c in todo]) if any(c in todo for c in chosen) else None
    metrics = evaluate_stitches(net, loader, todo, run.device, run.amp_dtype, args.log_interval, per_image=per_image)
    records = []
    for cfg_id, m in metrics.items():
        record = stitch_record(model, cfg_id, m, table.route_flops(model.routes[cfg_id]), run.data_cfg["input_size"],
                               data=data_source(val_ds))
        records.append(record)
        _logger.info(f"cfg {cfg_id:>3d} {record['route']}: acc1 {m['acc1']:.3f} acc5 {m['acc5']:.3f} "
                     f"loss {m['loss']:.4f} flops {record['flops'] / 1e9:.3f}G params {record['params'] / 1e6:.3f}M")
    if rank == 0:
        results.extend(records)
        _logger.info(f"results: {results.path}")
        if per_image is not None:
            _write_predictions(results, per_image)
    return metrics


def _prediction_ids(spec: str, model: RoutedNet) -> list[int]:
    """The cfg_ids of --save-predictions (anchors, all, none, or comma-separated cfg_ids and 'anchors')."""
    if spec == "none":
        return []
    if spec == "all":
        return list(range(model.num_configs))
    ids = set()
    for part in spec.split(","):
        ids |= set(range(model.n_anchors)) if part == "anchors" else {int(part)}
    bad = sorted(c for c in ids if c >= model.num_configs)
    if bad:
        raise UsageError(f"--save-predictions {spec}: cfg_id {bad} out of range; this network has cfg_ids "
                         f"0..{model.num_configs - 1}")
    return sorted(ids)


def _predictions_missing(results_file: Path, done: dict, chosen: list[int]) -> list[int]:
    """Chosen stitches already in the results file whose predictions the predictions file lacks (or holds for
    another record): evaluated again, so that both files stay of one evaluation."""
    from snnet.results.predictions import predictions_path, read_predictions, record_sha256
    from snnet.results.records import ResultsError
    have = [c for c in chosen if c in done]
    path = predictions_path(results_file)
    if not have:
        return []
    try:
        pred = read_predictions(path)
    except ResultsError:
        return have
    tied = pred.meta.get("record_sha256", {})
    return [c for c in have if tied.get(str(c)) != record_sha256(done[c])]


def _write_predictions(results: ResultsFile, per_image: PerImage) -> None:
    """The predictions of this evaluation, merged with those of earlier runs of the same evaluation, written
    atomically next to the results file and tied to its records."""
    from snnet.results.predictions import (
        build,
        merge,
        predictions_path,
        read_predictions,
        record_sha256,
        write_predictions,
    )
    from snnet.results.records import ResultsError
    path = predictions_path(results.path)
    records = results.completed()
    a = per_image.arrays
    new = build(a["sample_id"], a["label"], a["per_stitch"], records, per_image.num_classes)
    try:
        old = read_predictions(path) if path.exists() else None
    except ResultsError:
        old = None
    if old is not None:  # only stitches whose records are unchanged are kept
        keep = [int(c) for c in old.cfg_id if c in records and
                old.meta["record_sha256"].get(str(int(c))) == record_sha256(records[int(c)])]
        old = old.subset(keep) if keep else None
    pred = merge(old, new)
    write_predictions(path, pred)
    _logger.info(f"per-image predictions of cfg_id {pred.cfg_id.tolist()} ({len(pred.sample_id)} images): {path}")


# ------------------------------------------------------------------------------------------------------ training
def _freeze(model: RoutedNet, stitch_cfg: StitchConfig | None, args: argparse.Namespace) -> None:
    """--freeze-anchors: only the stitching layers train, the anchors stay in eval mode (no BatchNorm statistics or
    dropout updates, no optimizer state for them). SN-Net's ``fulltune: false``: the stitching layers and the class
    tokens train. A parameter frozen by its own layer (a LoRA layer's W) stays frozen either way."""
    if stitch_cfg is None:
        if args.freeze_anchors:
            raise UsageError("--freeze-anchors needs an SN-Net (--stitch_config): a plain --model has no stitching "
                             "layers to train")
        return
    if args.freeze_anchors:
        keep = lambda name: name.startswith("stitch_layers.")
        model.freeze_anchors()
    elif not stitch_cfg.get("fulltune"):
        keep = lambda name: name.startswith("stitch_layers.") or "cls" in name
    else:
        return
    for name, p in model.named_parameters():
        if not keep(name):
            p.requires_grad = False


def _resume_counters(args: argparse.Namespace, resume_state: dict | None, optimizer, loss_scaler) -> tuple[int, int]:
    """(start epoch, global step); the optimizer and scaler states unless --no-resume-opt (timm's semantics)."""
    start_epoch, global_step = 0, 0
    if resume_state is not None:  # a recovery checkpoint continues inside its epoch
        start_epoch = int(resume_state.get("epoch", -1)) + (0 if "batch_idx" in resume_state else 1)
        global_step = int(resume_state.get("global_step", 0))
        if not args.no_resume_opt and "optimizer" in resume_state:
            optimizer.load_state_dict(resume_state["optimizer"])
            if loss_scaler is not None and resume_state.get("amp_scaler"):
                loss_scaler.load_state_dict(resume_state["amp_scaler"])
    if args.start_epoch is not None:
        start_epoch = args.start_epoch
    return start_epoch, global_step


def _val_panel(args: argparse.Namespace, model: RoutedNet) -> list[int]:
    panel = args.val_stitches if args.val_stitches is not None else default_val_panel(model.num_configs,
                                                                                      model.n_anchors)
    if "all" in panel:
        panel = list(range(model.num_configs))
    bad = [c for c in panel if c >= model.num_configs]
    if bad:
        raise UsageError(f"--val-stitches {bad} out of range: this network has cfg_ids 0..{model.num_configs - 1}")
    if args.eval_metric.startswith("top1@") and int(args.eval_metric[5:]) not in panel:
        raise UsageError(f"--eval-metric {args.eval_metric}: cfg_id {args.eval_metric[5:]} is not in the validation "
                         f"panel {panel}; add it with --val-stitches or pick another metric")
    return panel


def _fault_injection(global_step: int) -> None:
    """Test hooks, only in the first attempt of a torchrun --max-restarts run or a Slurm job:
    SNNET_FAULT_KILL_AT_STEP=N kills this process with SIGKILL after optimizer step N (on the rank SNNET_FAULT_RANK,
    default all); SNNET_FAULT_WAIT_AT_STEP=N makes every rank write SNNET_FAULT_WAIT_FILE.<rank> after step N and
    wait there (at most 5 minutes) until it receives a stop signal (tests/test_slurm.py preempts it there)."""
    if restart_attempt() != 0 or requeued() != 0:
        return
    wait_at = os.environ.get("SNNET_FAULT_WAIT_AT_STEP")
    if wait_at is not None and int(wait_at) == global_step:
        write_text_atomic(f"{os.environ['SNNET_FAULT_WAIT_FILE']}.{os.environ.get('RANK', '0')}", f"{global_step}\n")
        end = time.monotonic() + 300
        while STOP.signum is None and time.monotonic() < end:
            time.sleep(0.05)
    at = os.environ.get("SNNET_FAULT_KILL_AT_STEP")
    if at is None or int(at) != global_step:
        return
    rank = os.environ.get("SNNET_FAULT_RANK")
    if rank is None or rank == os.environ.get("RANK", "0"):
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


def _validate(net, val_loader, panel: list[int], run: Run, epoch: int, train_loss: float,
              label: str = "") -> dict[str, float]:
    m = evaluate_stitches(net, val_loader, panel, run.device, run.amp_dtype, run.args.log_interval)
    metrics = {"loss": sum(v["loss"] for v in m.values()) / len(m), "top1": sum(v["acc1"] for v in m.values()) / len(m),
               "top5": sum(v["acc5"] for v in m.values()) / len(m)}
    metrics.update({f"top1@{c}": v["acc1"] for c, v in m.items()})
    model, front = unwrap(net), ""
    if len(panel) == model.num_configs and model.num_configs > 1:  # every stitch: the front's quality too
        from snnet.results.quality import front_quality
        table = cost_table(model, tuple(run.data_cfg["input_size"][1:]), run.data_cfg["input_size"][0])
        records = [{"cfg_id": c, "flops": table.route_flops(model.routes[c]), "acc1": v["acc1"]} for c, v in m.items()]
        metrics["front_hv"] = front_quality(records, range(model.n_anchors))["hypervolume"]
        front = f"; front hypervolume {metrics['front_hv']:.3f}"
    shown = panel if len(panel) <= 12 else f"all {len(panel)} stitches"
    _logger.info(f"epoch {epoch}{label}: train loss {train_loss:.4f}; panel {shown} mean top-1 {metrics['top1']:.3f} "
                 f"loss {metrics['loss']:.4f}{front}")
    return metrics


def _truncate_summary(path: Path, start_epoch: int) -> None:
    """A resumed run redoes epochs >= start_epoch: drop their rows (written before the kill) from summary.csv."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = lines[:1] + [l for l in lines[1:] if l.split(",", 1)[0].isdigit() and int(l.split(",", 1)[0]) < start_epoch]
    write_text_atomic(path, "".join(keep))


def _recovery_writer(model: RoutedNet, optimizer, ctx: TrainContext, saver: CheckpointSaver, run: Run):
    """Writes ``recovery.pth.tar`` after an optimizer step inside an epoch (a collective: every rank calls it).
    Every rank contributes what it needs to continue exactly: its RNG states after the last two steps and its share
    of the epoch's loss."""
    args_json = json.dumps(vars(run.args), default=str)

    def write(global_step: int) -> None:
        rng = list(ctx.rng_after)
        mine = {"rng": rng[-1], "rng_prev": rng[0] if len(rng) == 2 else None, "epoch_loss": list(ctx.epoch_loss)}
        ranks = [mine]
        if world()[1] > 1:
            ranks = [None] * world()[1]
            torch.distributed.all_gather_object(ranks, mine)
        if run.primary:
            state = training_state(model, optimizer, ctx.epoch, global_step, args_json, run.config_text,
                                   ctx.loss_scaler, ema=_ema_net(ctx))
            saver.save_recovery({**state, "batch_idx": ctx.epoch_step, "ranks": ranks})
    return write


def _recovery_hook(write, ctx: TrainContext, every: int, steps_per_epoch: int):
    """After-step hook writing the recovery checkpoint every --recovery-interval steps (not at an epoch's end, where
    last.pth.tar is written)."""
    def save(global_step: int) -> None:
        if every and not global_step % every and ctx.epoch_step != steps_per_epoch:
            write(global_step)
    return save


def _stop_hook(write, ctx: TrainContext, run: Run, steps_per_epoch: int):
    """After-step hook of a run under Slurm (`snnet.train.preempt`): once any rank got SIGUSR1/SIGTERM, every rank
    stops after this same step. Inside an epoch the recovery checkpoint is written and the run ends (`Preempted`);
    at an epoch's last step the epoch ends as usual (validation, last.pth.tar) and `fit` stops after it."""
    def check(global_step: int) -> None:
        if ctx.stop_after_epoch or not STOP.agreed(run.device):
            return
        if ctx.epoch_step == steps_per_epoch:
            ctx.stop_after_epoch = True
            return
        write(global_step)
        _all_saved()
        raise Preempted(f"{STOP.name()} after step {global_step} (epoch {ctx.epoch}, step {ctx.epoch_step} of "
                        f"{steps_per_epoch}): {run.out_dir / RECOVERY} written; --auto-resume (or a requeued Slurm "
                        f"job) continues there")
    return check


def _all_saved() -> None:
    """Before a preempted run exits: every rank waits for rank 0's checkpoint (srun --kill-on-bad-exit ends the
    other tasks as soon as one exits with a non-zero code)."""
    if world()[1] > 1:
        torch.distributed.barrier()


def _ema_net(ctx: TrainContext) -> RoutedNet | None:
    return ctx.model_ema.module if ctx.model_ema is not None else None


def _continue_epoch(ctx: TrainContext, resume_state: dict | None, accum: int = 1) -> None:
    """From a recovery checkpoint: skip the steps its epoch already trained and replay this rank's RNG."""
    if resume_state is None or "batch_idx" not in resume_state:
        return
    rank, world_size = world()
    ranks = resume_state["ranks"]
    if len(ranks) != world_size:
        raise CheckpointError(f"recovery checkpoint of {len(ranks)} process(es) cannot continue on {world_size}; "
                              f"resume it with {len(ranks)} processes, or resume from {LAST} instead")
    saved = (json_field(resume_state, "args") or {}).get("grad_accum_steps", 1)
    if saved != accum:
        raise CheckpointError(f"recovery checkpoint made with --grad-accum-steps {saved} cannot continue its epoch "
                              f"with {accum}; resume it with --grad-accum-steps {saved}, or resume from {LAST}")
    ctx.skip = int(resume_state["batch_idx"])
    ctx.restore = [ranks[rank]["rng_prev"], ranks[rank]["rng"]]
    ctx.epoch_loss = [float(v) for v in ranks[rank]["epoch_loss"]]


def _sampler(net: RoutedNet, run: Run, rank: int):
    spec = run.stitch_cfg.get("sampler") if run.stitch_cfg is not None else None
    # frozen anchors: an anchor's own route has nothing to train, so it is not drawn
    exclude = [c for c, steps in enumerate(net.routes) if all(isinstance(s, UnitStep) for s in steps)] \
        if run.args.freeze_anchors else []
    train_exclude = run.stitch_cfg.get("train_exclude") or [] if run.stitch_cfg is not None else []
    try:
        return create_sampler(spec, net, run.args.seed, rank, sync=run.args.sample_sync, exclude=exclude,
                              train_exclude=train_exclude)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"stitch config field 'sampler' {spec!r}: {e}") from None


def _setup_training(net: RoutedNet, train_ds, run: Run, resume_state: dict | None):
    """Optimizer, scaler, loader, loss, schedule and the loop context, resumed where the checkpoint left off."""
    from timm.utils import NativeScaler
    args, (rank, world_size) = run.args, world()
    _freeze(net, run.stitch_cfg, args)
    accum = args.grad_accum_steps
    lr, warmup_lr, min_lr = resolve_lrs(args, args.batch_size * world_size * accum)
    optimizer = create_optimizer(args, net, lr)
    loss_scaler = NativeScaler(device=run.device.type) if run.amp_dtype == torch.float16 else None
    start_epoch, global_step = _resume_counters(args, resume_state, optimizer, loss_scaler)
    loader = create_train_loader(train_ds, run.loader, run.data_cfg, run.device)
    steps = len(loader) // accum  # optimizer steps per epoch; the remainder batches are dropped
    if steps == 0:
        raise UsageError(f"--grad-accum-steps {accum} exceeds the {len(loader)} training batch(es) per process and "
                         f"epoch; lower it or -b/--batch-size")
    loss_fn, mixup_fn = create_loss(args, run.device)
    scheduler, num_epochs = create_scheduler(args, optimizer, steps, warmup_lr, min_lr, start_epoch,
                                             global_step if resume_state is not None else None)
    ctx = TrainContext(run.device, _sampler(net, run, rank),
                       run.amp_dtype, loss_scaler, scheduler, mixup_fn, model_ema=_model_ema(net, args, resume_state),
                       parameters=lambda: [p for p in net.parameters() if p.requires_grad], global_step=global_step,
                       after_step=[_fault_injection])
    _continue_epoch(ctx, resume_state, accum)
    if args.grad_checkpointing:
        net.set_grad_checkpointing(True)
    compiled = 0
    if args.torchcompile:  # after the EMA's copy; FLOPs are traced by torch.jit, which cannot enter compiled code
        cost_table(net, tuple(run.data_cfg["input_size"][1:]), run.data_cfg["input_size"][0])  # so trace them now
        compiled = net.compile_blocks(args.torchcompile)
    if run.primary:
        _logger.info(f"output: {run.out_dir}; {net.num_configs} network(s); lr {lr:.3e} (anchors "
                     f"x{anchor_lr_scale(args)}); {steps} steps/epoch" + (f" of {accum} batches" if accum > 1 else "")
                     + f"; {world_size} process(es); amp {run.amp_dtype}"
                     + (f"; torch.compile ({args.torchcompile}) of {compiled} block module(s)" if compiled else "")
                     + ("; gradient checkpointing" if args.grad_checkpointing else "")
                     + (f"; EMA decay {args.model_ema_decay}" if ctx.model_ema is not None else ""))
    return optimizer, loader, loss_fn, ctx, range(start_epoch, num_epochs)


def _model_ema(net: RoutedNet, args: argparse.Namespace, resume_state: dict | None):
    """--model-ema: timm's ModelEmaV3 of the network, restored from the checkpoint's state_dict_ema (a checkpoint
    without one starts it from the resumed weights, as timm's load_checkpoint(use_ema=True) falls back)."""
    if not args.model_ema:
        return None
    from timm.utils import ModelEmaV3
    ema = ModelEmaV3(net, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)
    if resume_state is not None and "state_dict_ema" in resume_state:
        try:
            ema.module.load_checkpoint_state(resume_state["state_dict_ema"])
        except StateDictMismatch as e:
            raise CheckpointError(f"--resume {args.resume!r}: its state_dict_ema does not fit this model "
                                  f"({e})") from None
    elif resume_state is not None:
        _logger.info("--model-ema: the checkpoint has no EMA weights; the EMA starts from the resumed weights")
    return ema


def fit(net: RoutedNet, train_ds, val_ds, run: Run, resume_state: dict | None) -> None:
    """Train epoch by epoch (validation panel, checkpoints, summary.csv), then evaluate every stitch."""
    from timm.utils import distribute_bn, update_summary
    args, (rank, world_size) = run.args, world()
    model = unwrap(net)
    optimizer, loader, loss_fn, ctx, epochs = _setup_training(model, train_ds, run, resume_state)
    if args.distributed:  # each process trains its own stitch, so the used parameters differ between processes
        ddp_kwargs = {"device_ids": [run.device.index]} if run.device.type == "cuda" else {}
        net = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True, **ddp_kwargs)
    panel = _val_panel(args, model)
    val_loader = create_eval_loader(val_ds, run.loader, run.data_cfg, rank, world_size) if val_ds is not None else None
    by_loss = "loss" in args.eval_metric or val_loader is None  # no validation split: best by training loss
    if val_loader is None and run.primary:
        _logger.info("no validation split: model_best.pth.tar is the epoch with the lowest training loss")
    saver = CheckpointSaver(run.out_dir, higher_is_better=not by_loss, max_history=args.checkpoint_hist)
    saver.best = resume_state.get("best_metric") if resume_state is not None else None
    steps_per_epoch = len(loader) // args.grad_accum_steps
    write_recovery = _recovery_writer(model, optimizer, ctx, saver, run)
    catching = STOP.install()  # under Slurm: SIGUSR1/SIGTERM stop the run at an agreed step, with a recovery file
    ctx.snapshot_rng = args.recovery_interval > 0 or catching
    ctx.after_step.insert(0, _recovery_hook(write_recovery, ctx, args.recovery_interval, steps_per_epoch))
    ctx.after_step.append(_stop_hook(write_recovery, ctx, run, steps_per_epoch))  # after the fault hooks
    args_json = json.dumps(vars(args), default=str)
    if run.primary:
        _truncate_summary(run.out_dir / "summary.csv", epochs.start)
    loggers = run.loggers or Loggers()
    ctx.clock = RunClock(epochs, model.num_configs, len(val_ds) // world_size if val_ds is not None else 0,
                         1 + (ctx.model_ema is not None))
    for epoch in epochs:
        ctx.clock.start(epoch)
        seed_epoch(args.seed, rank, epoch)
        if args.distributed and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        if hasattr(loader.dataset, "set_epoch"):  # a shard stream: the epoch's order is drawn from (seed, epoch)
            loader.dataset.set_epoch(epoch)
        if ctx.mixup_fn is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
            ctx.mixup_fn.mixup_enabled = False
        train_metrics = train_one_epoch(epoch, net, loader, optimizer, loss_fn, args, ctx)
        ctx.clock.trained(len(loader) // args.grad_accum_steps * args.grad_accum_steps * args.batch_size)
        if args.distributed and args.dist_bn in ("broadcast", "reduce"):
            distribute_bn(model, world_size, args.dist_bn == "reduce")
        eval_metrics, metric = {}, train_metrics["loss"] if by_loss else None
        if val_loader is not None and (epoch + 1) % args.val_interval == 0:
            eval_metrics = _validate(net, val_loader, panel, run, epoch, train_metrics["loss"])
            if ctx.model_ema is not None:  # as timm: the EMA's metrics are the epoch's (summary, model_best)
                if args.distributed and args.dist_bn in ("broadcast", "reduce"):
                    distribute_bn(ctx.model_ema.module, world_size, args.dist_bn == "reduce")
                eval_metrics = _validate(ctx.model_ema.module, val_loader, panel, run, epoch, train_metrics["loss"],
                                         " (EMA)")
            metric = eval_metrics[args.eval_metric] if args.eval_metric in eval_metrics else eval_metrics["top1"]
            ctx.clock.validated(len(panel))
        lrs = [g["lr"] for g in optimizer.param_groups]
        ctx.lr_scheduler.step(epoch + 1 - epoch_offset(args), metric)
        if run.primary:
            try:  # timm appends the row in place: a full disk is said as every other write says it
                update_summary(epoch, train_metrics, eval_metrics, filename=str(run.out_dir / "summary.csv"),
                               lr=sum(lrs) / len(lrs), write_header=None)
            except OSError as e:
                if is_disk_full(e, run.out_dir):
                    raise disk_full_error(run.out_dir, "'summary.csv'", 0) from None
                raise
            state = training_state(model, optimizer, epoch, ctx.global_step, args_json, run.config_text,
                                   ctx.loss_scaler, ema=_ema_net(ctx))
            improved = saver.save(state, metric)
            saver.drop_recovery()
            _logger.info(f"saved {run.out_dir / LAST}" + (" (best so far)" if improved else ""))
            loggers.log_epoch(epoch, train_metrics, eval_metrics, sum(lrs) / len(lrs))
        took = ctx.clock.finish()
        if run.primary:
            _logger.info(ctx.clock.summary(took))
        if ctx.stop_after_epoch and epoch + 1 < epochs.stop:
            _all_saved()
            raise Preempted(f"{STOP.name()} in the last step of epoch {epoch}: {run.out_dir / LAST} written; "
                            f"--auto-resume (or a requeued Slurm job) continues with epoch {epoch + 1}")
    if val_ds is not None:
        ckpt_hash = file_sha256(run.out_dir / LAST) if run.primary else ""
        evaluate_all(net, val_ds, run, ckpt_hash)
        if ctx.model_ema is not None:
            evaluate_all(ctx.model_ema.module, val_ds, run, ckpt_hash, EMA_RESULTS_FILE)
        loggers.log_final_front(run.out_dir / RESULTS_FILE, run.out_dir, epochs.stop)
    loggers.close()


if __name__ == "__main__":
    sys.exit(main())
