"""stitch-train's sweep as tasks (a run, or one anchor's evaluation: the sweep's unit of work, numbered as a Slurm
job array's tasks run them): split across torchrun processes or the tasks of a Slurm job array, their results
collected into the sweep's results file and plots (`run_sweep`, `merge`, `submit_array`). The package's docstring
(`snnet.explore.stitch_train`) describes the experiment."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist

from snnet.explore.stitch_train.plots import write_sweep_plots
from snnet.explore.stitch_train.runner import (
    RESULT,
    RunPlan,
    SweepSetup,
    evaluate_anchor,
    prepare,
    train_run,
)
from snnet.explore.stitch_train.sweep import (
    FORMAT,
    SWEEP_JSON,
    Sweep,
    SweepError,
)
from snnet.results.records import RESULTS_FILE, write_results
from snnet.utils.distributed import world
from snnet.utils.fileio import write_text_atomic
from snnet.utils.progress import Progress
from snnet.utils.slurm import submit

_logger = logging.getLogger("snnet")


# ---------------------------------------------------------------------------------------------- the sweep
@dataclass
class SweepSummary:
    out: Path
    results_file: Path | None
    trained: list[int]       # cfg_ids trained by this process now
    skipped: list[int]       # cfg_ids already finished
    elsewhere: list[int]     # cfg_ids another process trains
    records: list[dict[str, Any]]
    anchors: dict[str, Any]  # label -> the (frozen) anchor models used
    plans: list[RunPlan] = field(default_factory=list)  # per run: folder name, route, resolved end block
    anchor_ids: dict[str, dict[str, Any]] = field(default_factory=dict)  # label -> identity (weights' sha256 ...)


def _tasks(prep: SweepSetup) -> list[tuple[str, Any, Path]]:
    """Runs, then one evaluation per anchor used: (kind, what, the file that marks it done). An anchor's evaluation
    is named by a hash of its identity (weights included), the data and the recipe, so it is never stale."""
    out = prep.sweep.out
    tasks: list[tuple[str, Any, Path]] = [("run", (run, plan), out / "runs" / plan.name / RESULT)
            for run, plan in zip(prep.sweep.runs, prep.plans)]
    for label, ident in prep.anchor_ids.items():
        h = hashlib.sha256(json.dumps({**ident, "data": os.path.abspath(prep.data.data_dir),
                                       "train": prep.train_recipe}, sort_keys=True,
                                      default=str).encode()).hexdigest()[:8]
        tasks.append(("anchor", label, out / "anchors" / f"{label}_{h}.json"))
    return tasks


def collect(prep: SweepSetup) -> list[dict[str, Any]]:
    """The results-file records of every finished task: runs as cfg_id = their index, then the anchors."""
    records = []
    for k, (kind, _what, done) in enumerate(_tasks(prep)):
        if not done.is_file():
            continue
        r = json.loads(done.read_text())
        records.append(r["record"] if kind == "run" else {**r["record"], "cfg_id": k})
    return records


def _meet(world_size: int) -> None:
    """Under torchrun: wait for every process to finish its tasks (a gloo process group, used once as a barrier)."""
    if world_size <= 1:
        return
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(days=7))
    dist.barrier()


def _finish(prep: SweepSetup, records: list[dict[str, Any]]) -> Path:
    """The sweep's results file and its pictures (sweep.png, curves.png: what `snnet report` shows)."""
    write_results(prep.sweep.out / RESULTS_FILE, records)
    write_sweep_plots(prep.sweep.out, records)
    return prep.sweep.out / RESULTS_FILE


def run_sweep(sweep: Sweep, dry_run: bool = False, task: int | None = None) -> SweepSummary:
    """Every unfinished task of this process (all of them outside torchrun), or only task `task` (a Slurm array
    task); the results file at the end (with `task`: once every task is finished, by the one that finds so)."""
    rank, world_size = world(launched=True) if task is None else (0, 1)  # torchrun's: no group for the runs
    prep = prepare(sweep)
    tasks = _tasks(prep)
    if task is not None and not 0 <= task < len(tasks):
        raise SweepError(f"--task {task}: this sweep has tasks 0..{len(tasks) - 1} ({len(sweep.runs)} runs, then the "
                         f"anchor evaluations); submit it again with --submit")
    done = [k for k, (_, _, marker) in enumerate(tasks) if marker.is_file()]
    mine = [k for k in range(len(tasks)) if k % world_size == rank and k not in done and task in (None, k)]
    n = len(sweep.runs)
    summary = SweepSummary(sweep.out, None, [], [k for k in done if k < n],
                           [k for k in range(n) if k % world_size != rank and k not in done], [], prep.models,
                           prep.plans, prep.anchor_ids)
    if dry_run:
        summary.records = collect(prep)
        return summary
    sweep.out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        listing = {"format": FORMAT, "source": sweep.source, "data": os.path.abspath(prep.data.data_dir),
                   "train": prep.train_recipe, "seed": sweep.seed,
                   "runs": [{"cfg_id": r.index, "run": p.name, "route": p.route, "front": r.front,
                             "end": r.end, "cut": r.cut, "end_block": p.end_block, "gap": p.gap,
                             "layer": r.layer_spec, "ls_init": r.ls_init, "loss": r.loss, "seed": r.seed}
                            for r, p in zip(sweep.runs, prep.plans)],
                   "anchors": {label: ident for label, ident in prep.anchor_ids.items()}}
        write_text_atomic(sweep.out / SWEEP_JSON, json.dumps(listing, indent=1) + "\n")
    _logger.info(f"{sweep.source}: {n} runs + {len(tasks) - n} anchor evaluations; {len(done)} already done"
                 + (f"; process {rank} of {world_size} takes {len(mine)}" if world_size > 1 else
                    f"; {len(mine)} to do") + f"; output {sweep.out}")
    progress = Progress("Sweep", max(len(mine), 1), 1, unit=None)
    for step, k in enumerate(mine, start=1):
        kind, what, marker = tasks[k]
        t0 = time.perf_counter()
        if kind == "run":
            run, plan = what
            result = train_run(prep, run, plan, marker.parent, rank, world_size)
            summary.trained.append(k)
            extra = f"cfg {k} {plan.route}: top-1 {result['acc1']:.2f} (init {result['init_acc1']:.2f})"
        else:
            result = evaluate_anchor(prep, what)
            write_text_atomic(marker, json.dumps(result, indent=1) + "\n")
            extra = f"anchor {what}: top-1 {result['acc1']:.2f}"
        progress.update(step, 1, f"{extra} in {time.perf_counter() - t0:.1f}s")
        if world_size == 1 and task is None:  # the results so far, after every task (torchrun: rank 0, at the end)
            write_results(sweep.out / RESULTS_FILE, collect(prep))
    _meet(world_size)
    summary.records = collect(prep)
    if task is not None:  # an array task: the one that finds every task finished merges (identical if several do)
        missing = [k for k, (_, _, marker) in enumerate(tasks) if not marker.is_file()]
        if not missing:
            summary.results_file = _finish(prep, summary.records)
        else:
            _logger.info(f"task {task} done; tasks {missing} not finished yet: the last task writes {RESULTS_FILE} "
                         f"(or snnet stitch-train --sweep ... --merge)")
    elif rank == 0:
        summary.results_file = _finish(prep, summary.records)
    if world_size > 1:
        dist.destroy_process_group()
    return summary


def merge(sweep: Sweep) -> tuple[Path, list[int]]:
    """The results file (and pictures) from every finished task of the sweep, whoever ran it; (its path, the
    unfinished tasks)."""
    prep = prepare(sweep)
    tasks = _tasks(prep)
    missing = [k for k, (_, _, marker) in enumerate(tasks) if not marker.is_file()]
    records = collect(prep)
    if not records:
        raise SweepError(f"{sweep.source}: no finished run in {sweep.out}; run the sweep first (--submit, or without "
                         f"--merge)")
    return _finish(prep, records), missing


ARRAY_SCRIPT = "array.sbatch"


def submit_array(sweep: Sweep, sweep_file: str, data: str | None = None,
                 train: Sequence[tuple[str, Any]] = (), sbatch: str = "",
                 max_parallel: int | None = None) -> tuple[str | None, list[int]]:
    """`--submit`: the sweep's unfinished tasks as one Slurm job array (array task k runs task k with ``--task k``,
    reading `sweep_file`, over `data` and the `train` flags when given). Writes <out>/slurm/array.sbatch and runs sbatch
    with the `sbatch` options (at most `max_parallel` tasks at once); (the array's job id, or None when every task
    is finished, and the submitted task indices)."""
    prep = prepare(sweep)
    todo = [k for k, (_, _, marker) in enumerate(_tasks(prep)) if not marker.is_file()]
    if not todo:
        return None, []
    options = shlex.split(sbatch or "")
    if any(o == "-a" or o.startswith(("--array", "-a")) for o in options):
        raise SweepError(f"--sbatch {sbatch!r}: the array is the sweep's unfinished tasks; drop --array (limit "
                         f"the tasks running at once with --max-parallel N)")
    argv = [sys.executable, "-m", "snnet.cli", "stitch-train", "--sweep", os.path.abspath(sweep_file),
            "--out", os.path.abspath(sweep.out)]
    if data:
        argv.insert(4, os.path.abspath(data))
    for key, value in train:
        argv += ["--train", f"{key}={value!r}"]
    folder = sweep.out / "slurm"
    env = f"export PYTHONPATH={shlex.quote(os.environ['PYTHONPATH'])}\n" if os.environ.get("PYTHONPATH") else ""
    script = (f"#!/usr/bin/env bash\n# written by snnet stitch-train --submit: array task k runs task k of the sweep\n"
              f"#SBATCH --job-name=snnet-sweep\n#SBATCH --output={folder}/task-%A_%a.out\n#SBATCH --requeue\n"
              f"set -euo pipefail\ncd {shlex.quote(os.getcwd())}\n{env}"
              f"exec {' '.join(shlex.quote(a) for a in argv)} --task \"$SLURM_ARRAY_TASK_ID\"\n")
    write_text_atomic(folder / ARRAY_SCRIPT, script)
    spec = ",".join(map(str, todo)) + (f"%{max_parallel}" if max_parallel else "")
    return submit(str(folder / ARRAY_SCRIPT), [f"--array={spec}", *options]), todo


__all__ = ["ARRAY_SCRIPT", "SweepSummary", "collect", "merge", "run_sweep", "submit_array"]
