"""The run resolved once from its options and the launch's world size (`resolve_run`): the global batch, the learning
rates, the LR schedule and the output folder. train.py computes it once and hands the same `ResolvedRun` to the
preflight's checks, to ``--dry-run``'s description (args.yaml) and to the trainer, so none of them resolves them
again. Pure: nothing is read or written (the output folder is named here, made and locked by the run)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from snnet.train.optim import describe_schedule, resolve_lrs
from snnet.train.options import RunOptions, ScheduleOptions


def output_dir(options: RunOptions) -> Path:
    """Where the run writes: <output>/<experiment>; an evaluation of --resume CKPT without --output/--experiment
    writes next to the checkpoint (a rerun continues there)."""
    job = options.job
    if job.eval and job.resume and not (job.output or job.experiment):
        return Path(job.resume).resolve().parent
    name = job.experiment
    if not name:
        stem = Path(job.stitch_config).stem if job.stitch_config else options.network.model
        name = f"eval-{stem}" if job.eval else \
            f"{time.strftime('%Y%m%d-%H%M%S')}-{stem}-{options.network.img_size or 224}"
    return Path(job.output or "./output/train") / name


@dataclass(frozen=True)
class ResolvedRun:
    """What a run's options amount to at `world_size` processes, resolved once (`resolve_run`)."""
    world_size: int
    global_batch: int  # images per optimizer step, over every process: -b x processes x --grad-accum-steps
    lr: float
    warmup_lr: float
    min_lr: float
    out_dir: Path  # named once: a generated name holds the time of day
    schedule_options: ScheduleOptions
    eval_metric: str

    @cached_property
    def schedule(self) -> dict[str, Any]:
        """The LR schedule timm builds (`optim.describe_schedule`): built on first use, since building it is the
        check that refuses a schedule timm refuses (an evaluation builds none)."""
        return describe_schedule(self.schedule_options, self.eval_metric, self.warmup_lr, self.min_lr)


def resolve_run(options: RunOptions, world_size: int, out_dir: Path | None = None) -> ResolvedRun:
    """The run's `ResolvedRun`: its rates from `optim.resolve_lrs` (the one place they are computed), its folder
    `out_dir` (None: `output_dir`)."""
    global_batch, lr, warmup_lr, min_lr = resolve_lrs(options, world_size)
    return ResolvedRun(world_size, global_batch, lr, warmup_lr, min_lr,
                       output_dir(options) if out_dir is None else out_dir, options.schedule,
                       options.eval.eval_metric)


__all__ = ["ResolvedRun", "output_dir", "resolve_run"]
