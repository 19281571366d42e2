"""A run's configuration resolved once, before any work (`resolve`): what train.py's options amount to at the
launch's world size. The preflight's checks, ``--dry-run`` (args.yaml) and the trainer all read the one
`RunOptions` this returns, so nothing is resolved twice."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from snnet.train.device import agree_on_attempt, device_from_flag, requeued
from snnet.train.optim import describe_schedule, resolve_lrs
from snnet.train.options import RunOptions
from snnet.utils.checkpoint import LAST, RECOVERY
from snnet.utils.distributed import world
from snnet.utils.errors import UsageError

_logger = logging.getLogger("snnet")


def output_dir(options: RunOptions) -> Path:
    """Where the run writes: <output>/<experiment>; an evaluation of --resume CKPT without --output/--experiment
    writes next to the checkpoint (a rerun continues there). A generated name holds the time of day: name it
    once (`resolve`)."""
    job = options.job
    if job.eval and job.resume and not (job.output or job.experiment):
        return Path(job.resume).resolve().parent
    name = job.experiment
    if not name:
        stem = Path(job.stitch_config).stem if job.stitch_config else options.network.model
        name = f"eval-{stem}" if job.eval else \
            f"{time.strftime('%Y%m%d-%H%M%S')}-{stem}-{options.network.img_size or 224}"
    return Path(job.output or "./output/train") / name


def resolve(options: RunOptions, world_size: int | None = None) -> RunOptions:
    """`options` with everything derived from them and the launch filled in, frozen from then on:

    * the world size (`world_size`; None: the launcher's WORLD_SIZE, this process being one of the launch's), and
      this process's device: --device, by default ``cuda:LOCAL_RANK`` where CUDA is, else cpu;
    * the global batch and the learning rates (`optim.resolve_lrs`); a --min-lr above the LR and a schedule timm
      refuses are refused here;
    * the output folder (named once);
    * the checkpoint to continue from: --resume, or with --auto-resume (and in a launch's process restarted by
      torchrun or a requeued Slurm job) the folder's newest (the recovery file when there is one);
    * --dist-bn off where SyncBatchNorm already synchronises (as timm does).

    The number of classes, when no flag gives it, is the data's (else the stitch config's), known once the datasets
    are open (`Trainer.for_run`).

    Returns the resolved `RunOptions`; raises `UsageError` for rates that cannot be resolved."""
    job, train = options.job, options.train
    launched = world_size is None  # a launch's own process: a restarted launch continues from its checkpoint
    world_size = world(launched=True)[1] if world_size is None else world_size
    device = device_from_flag(train.device, per_rank=True, here=not job.dry_run)
    if device.type == "cuda" and device.index is None:  # each process its own GPU, as timm's process group binds it
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    lrs = resolve_lrs(options, world_size)
    if not job.eval:
        if lrs.min_lr > lrs.lr:
            raise UsageError(f"--min-lr {lrs.min_lr:g} is above the LR {lrs.lr:g}: the decaying schedule would raise "
                             f"the LR; lower --min-lr or raise --lr")
        describe_schedule(options.schedule, options.eval.eval_metric, lrs.warmup_lr, lrs.min_lr)  # timm refuses?
    out_dir = output_dir(options)
    resume = job.resume
    restarted = launched and (agree_on_attempt() > 0 or requeued() > 0)
    if not resume and not job.eval and not job.dry_run and (job.auto_resume or restarted):
        found = [out_dir / name for name in (RECOVERY, LAST) if (out_dir / name).exists()]
        if found:
            resume = str(found[0])
            _logger.info(f"auto-resume: continuing from {resume}")
    resolved = options.replaced(world_size=world_size, global_batch=lrs.global_batch, lr=lrs.lr,
                                warmup_lr=lrs.warmup_lr, min_lr=lrs.min_lr, out_dir=out_dir)
    if job.dry_run:  # resolved for any machine: the flags as typed (args.yaml's entries), the rates and the folder
        return resolved
    distributed = world_size > 1
    synced = train.sync_bn and distributed and not job.eval
    resolved = resolved.replaced(device=str(device), distributed=distributed, resume=resume,
                                 dist_bn="" if synced else train.dist_bn)
    return resolved


__all__ = ["output_dir", "resolve"]
