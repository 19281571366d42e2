"""`snnet stitch-train`: train one stitching layer between two frozen anchors (Traft & Cheney's experiment).

A run is the network

    front anchor, from its input up to and including its block i  ->  stitch  ->  end anchor from block j on

with blocks numbered flat over the stages (0 = the first block). j may be any block (a "gap"): the block aligned with
i, one after it (dropping depth), one before it (repeating depth), or one past the last block (the end anchor only
runs its final norm and head). Front and end may be the same anchor, two anchors of one family, or two families whose
features meet at the same number of positions: the layout bridges (tokens, NHWC, NCHW) and the prefix-token bridge
of `snnet.core.cut.CutStitch` (a class-token ViT <-> CNN pair drops the class token, or predicts it). Only the stitch
trains: both anchors are frozen and stay in eval mode, so their weights and BatchNorm statistics are exactly the
given ones after training, and dropout / drop-path stay off. The loss is cross-entropy, or distillation from the end
anchor's own logits (KL at a temperature, mixed with cross-entropy by kd_alpha).

The package, by concern:

* `sweep.py`: the sweep file (YAML, docs/stitch_train.md): schema, checks, the runs it expands to; anchors in the
  one anchor syntax of every tool (`snnet.core.config.parse_anchor`).
* `network.py`: the stitched network, on the core's one cut mechanism: `snnet.core.cut` (cut points, the
  stitchability rule, `CutStitch` and its least-squares fit) and a `snnet.core.model.ComposedNet` of one
  `Composition`, as `snnet search` builds its networks.
* `runner.py`: the sweep prepared (anchors seeded, built once, hashed by their weights) and one run trained and
  evaluated with train.py's loop, optimizer, schedule, loaders and losses.
* here: the sweep's jobs split across torchrun processes or the tasks of a Slurm job array, the results file, and
  the command line.

Each run writes, in its own folder named after what it is plus a hash of everything that defines it (so editing the
sweep never mixes runs): ``trajectory.jsonl`` (a line per optimizer step and per epoch, rewritten atomically after
every epoch), ``stitch_layer.pth.tar`` (the trained stitch) and, last, ``result.json`` (metadata and final metrics).
A run whose result.json exists is finished and skipped by a rerun. The sweep folder gets ``stitches_res.txt``
(cfg_id = the run's index in the sweep; the anchors follow as the last cfg_ids) that `snnet pareto` reads.

Under torchrun the jobs are split across the processes (job k on rank k mod world size), each run in one process,
with no communication: a run's result is then the same whether the sweep ran in one process or in many, and a
half-finished sweep can be continued with any number of processes. Sweeps are many small, independent jobs (only a
stitch trains, anchors in eval mode have nothing to synchronise), so splitting them scales with no gradient
all-reduce and no batch-size/LR coupling to the world size. At the end the processes meet once (a gloo process
group, used only as a barrier) and rank 0 writes the results file and the table.

On Slurm, ``--submit`` sends the unfinished jobs as a job array (`submit_array`, docs/slurm.md): array task k runs
job k alone (``--task k``, as Traft & Cheney's launcher runs one experiment per array task), and the task that
finds every job finished writes the results file; ``--merge`` writes it from whatever is finished.

User errors are `SNNetError`s (`SweepError` and the core's own); `snnet`'s main catches them once and prints one
line (on rank 0 only).
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist

from snnet.core.fileio import write_text_atomic
from snnet.core.progress import Progress
from snnet.core.slurm import submit
from snnet.explore.stitch_train.network import (
    AnchorProbe,
    Stitched,
    StitchedNet,
    build_stitched,
    fit_stitch,
    probe_anchor,
)
from snnet.explore.stitch_train.plots import write_sweep_plots
from snnet.explore.stitch_train.runner import (
    LAYER_CKPT,
    RESULT,
    TRAJECTORY,
    Prepared,
    RunPlan,
    evaluate_anchor,
    plan_run,
    prepare,
    train_run,
    weights_sha256,
)
from snnet.explore.stitch_train.sweep import (
    FORMAT,
    RUN_FIELDS,
    SWEEP_KEYS,
    TRAIN_DEFAULTS,
    TRAIN_REFUSED,
    RunSpec,
    Sweep,
    SweepError,
    aligned_block,
    anchor_argument,
    layer_label,
    load_sweep,
    parse_sweep,
)
from snnet.results.pareto import human
from snnet.results.records import RESULTS_FILE, write_results

__all__ = ["AnchorProbe", "FORMAT", "LAYER_CKPT", "RESULT", "RUN_FIELDS", "RunPlan", "RunSpec", "SWEEP_JSON",
           "SWEEP_KEYS", "Stitched", "StitchedNet", "Sweep", "SweepError", "SweepSummary", "TRAIN_DEFAULTS",
           "TRAIN_REFUSED", "TRAJECTORY", "Prepared", "add_subcommand", "aligned_block", "build_stitched",
           "collect", "command", "evaluate_anchor", "fit_stitch", "layer_label", "load_sweep", "merge", "parse_sweep",
           "plan_run", "prepare", "probe_anchor", "run_sweep", "submit_array", "sweep_from_args", "train_run",
           "weights_sha256"]

_logger = logging.getLogger("snnet")

SWEEP_JSON = "sweep.json"


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


def _jobs(prep: Prepared) -> list[tuple[str, Any, Path]]:
    """Runs, then one evaluation per anchor used: (kind, what, the file that marks it done). An anchor's evaluation
    is named by a hash of its identity (weights included), the data and the recipe, so it is never stale."""
    out = prep.sweep.out
    jobs: list[tuple[str, Any, Path]] = [("run", (run, plan), out / "runs" / plan.name / RESULT)
            for run, plan in zip(prep.sweep.runs, prep.plans)]
    for label, ident in prep.anchor_ids.items():
        h = hashlib.sha256(json.dumps({**ident, "data": os.path.abspath(prep.data.data_dir),
                                       "train": prep.train_recipe}, sort_keys=True,
                                      default=str).encode()).hexdigest()[:8]
        jobs.append(("anchor", label, out / "anchors" / f"{label}_{h}.json"))
    return jobs


def collect(prep: Prepared) -> list[dict[str, Any]]:
    """The results-file records of every finished job: runs as cfg_id = their index, then the anchors."""
    records = []
    for k, (kind, _what, done) in enumerate(_jobs(prep)):
        if not done.is_file():
            continue
        r = json.loads(done.read_text())
        records.append(r["record"] if kind == "run" else {**r["record"], "cfg_id": k})
    return records


def _world() -> tuple[int, int]:
    """(rank, world size) of a torchrun launch, from its environment (no process group is made for the runs)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _meet(world_size: int) -> None:
    """Under torchrun: wait for every process to finish its jobs (a gloo process group, used once as a barrier)."""
    if world_size <= 1:
        return
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(days=7))
    dist.barrier()


def _finish(prep: Prepared, records: list[dict[str, Any]]) -> Path:
    """The sweep's results file and its pictures (sweep.png, curves.png: what `snnet report` shows)."""
    write_results(prep.sweep.out / RESULTS_FILE, records)
    write_sweep_plots(prep.sweep.out, records)
    return prep.sweep.out / RESULTS_FILE


def run_sweep(sweep: Sweep, dry_run: bool = False, task: int | None = None) -> SweepSummary:
    """Every unfinished job of this process (all of them outside torchrun), or only job `task` (a Slurm array
    task); the results file at the end (with `task`: once every job is finished, by the task that finds so)."""
    rank, world_size = _world() if task is None else (0, 1)
    prep = prepare(sweep)
    jobs = _jobs(prep)
    if task is not None and not 0 <= task < len(jobs):
        raise SweepError(f"--task {task}: this sweep has jobs 0..{len(jobs) - 1} ({len(sweep.runs)} runs, then the "
                         f"anchor evaluations); submit it again with --submit")
    done = [k for k, (_, _, marker) in enumerate(jobs) if marker.is_file()]
    mine = [k for k in range(len(jobs)) if k % world_size == rank and k not in done and task in (None, k)]
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
    _logger.info(f"{sweep.source}: {n} runs + {len(jobs) - n} anchor evaluations; {len(done)} already done"
                 + (f"; process {rank} of {world_size} takes {len(mine)}" if world_size > 1 else
                    f"; {len(mine)} to do") + f"; output {sweep.out}")
    progress = Progress("Sweep", max(len(mine), 1), 1, unit=None)
    for step, k in enumerate(mine, start=1):
        kind, what, marker = jobs[k]
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
        if world_size == 1 and task is None:  # the results so far, after every job (torchrun: rank 0, at the end)
            write_results(sweep.out / RESULTS_FILE, collect(prep))
    _meet(world_size)
    summary.records = collect(prep)
    if task is not None:  # an array task: the one that finds every job finished merges (identical if several do)
        missing = [k for k, (_, _, marker) in enumerate(jobs) if not marker.is_file()]
        if not missing:
            summary.results_file = _finish(prep, summary.records)
        else:
            _logger.info(f"job {task} done; jobs {missing} not finished yet: the last task writes {RESULTS_FILE} "
                         f"(or snnet stitch-train --sweep ... --merge)")
    elif rank == 0:
        summary.results_file = _finish(prep, summary.records)
    if world_size > 1:
        dist.destroy_process_group()
    return summary


def merge(sweep: Sweep) -> tuple[Path, list[int]]:
    """The results file (and pictures) from every finished job of the sweep, whoever ran it; (its path, the
    unfinished jobs)."""
    prep = prepare(sweep)
    jobs = _jobs(prep)
    missing = [k for k, (_, _, marker) in enumerate(jobs) if not marker.is_file()]
    records = collect(prep)
    if not records:
        raise SweepError(f"{sweep.source}: no finished run in {sweep.out}; run the sweep first (--submit, or without "
                         f"--merge)")
    return _finish(prep, records), missing


ARRAY_SCRIPT = "array.sbatch"


def submit_array(sweep: Sweep, args: argparse.Namespace) -> tuple[str | None, list[int]]:
    """`--submit`: the sweep's unfinished jobs as one Slurm job array (task k runs job k with ``--task k``). Writes
    <out>/slurm/array.sbatch and runs sbatch with --sbatch's options; (the array's job id, or None when every job
    is finished, and the submitted job indices)."""
    prep = prepare(sweep)
    todo = [k for k, (_, _, marker) in enumerate(_jobs(prep)) if not marker.is_file()]
    if not todo:
        return None, []
    options = shlex.split(args.sbatch or "")
    if any(o == "-a" or o.startswith(("--array", "-a")) for o in options):
        raise SweepError(f"--sbatch {args.sbatch!r}: the array is the sweep's unfinished jobs; drop --array (limit "
                         f"the tasks running at once with --max-parallel N)")
    argv = [sys.executable, "-m", "snnet.cli", "stitch-train", "--sweep", os.path.abspath(args.sweep),
            "--out", os.path.abspath(sweep.out)]
    if args.data:
        argv.insert(4, os.path.abspath(args.data))
    for key, value in args.train:
        argv += ["--train", f"{key}={value!r}"]
    folder = sweep.out / "slurm"
    env = f"export PYTHONPATH={shlex.quote(os.environ['PYTHONPATH'])}\n" if os.environ.get("PYTHONPATH") else ""
    script = (f"#!/usr/bin/env bash\n# written by snnet stitch-train --submit: array task k runs job k of the sweep\n"
              f"#SBATCH --job-name=snnet-sweep\n#SBATCH --output={folder}/task-%A_%a.out\n#SBATCH --requeue\n"
              f"set -euo pipefail\ncd {shlex.quote(os.getcwd())}\n{env}"
              f"exec {' '.join(shlex.quote(a) for a in argv)} --task \"$SLURM_ARRAY_TASK_ID\"\n")
    write_text_atomic(folder / ARRAY_SCRIPT, script)
    spec = ",".join(map(str, todo)) + (f"%{args.max_parallel}" if args.max_parallel else "")
    return submit(str(folder / ARRAY_SCRIPT), [f"--array={spec}", *options]), todo


# ---------------------------------------------------------------------------------------------- command line
def _key_value(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: write key=value, e.g. epochs=3")
    try:
        return key, ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return key, raw


def add_subcommand(sub) -> None:
    """`snnet stitch-train` (snnet/cli.py registers it)."""
    p = sub.add_parser(
        "stitch-train", help="train one stitching layer between two frozen anchors, or a YAML sweep of them",
        description="Front anchor up to block i, a stitching layer, end anchor from block j (any gap); only the "
        "layer trains, the anchors stay frozen in eval mode. Each run writes trajectory.jsonl, stitch_layer.pth.tar "
        "and result.json (last) in its folder; the sweep folder gets stitches_res.txt for snnet pareto. Finished "
        "runs are skipped on rerun. Under torchrun the runs are split across the processes. See "
        "docs/stitch_train.md.")
    p.add_argument("data", nargs="?", metavar="DATA", help="dataset folder with train/ and val/ (overrides the "
                   "sweep's `data`)")
    p.add_argument("--sweep", metavar="YAML", help="a sweep file (e.g. configs/sweeps/digits_3x3.yaml)")
    p.add_argument("--out", metavar="DIR", help="output folder (overrides the sweep's `out`)")
    p.add_argument("--train", type=_key_value, nargs="+", action="extend", default=[], metavar="FLAG=VALUE",
                   help="train.py flags for every run, e.g. epochs=3 lr=1e-3 img_size=16 (over the sweep's `train`); "
                   "given twice, the flags add up (a key given again takes its later value)")
    p.add_argument("--dry-run", action="store_true", help="check everything and list the runs; train nothing")
    slurm = p.add_argument_group("Slurm (docs/slurm.md)")
    slurm.add_argument("--submit", action="store_true", help="submit the sweep's unfinished jobs as a Slurm job "
                       "array (one run or anchor evaluation per array task) instead of running them here")
    slurm.add_argument("--sbatch", metavar="OPTIONS", help="sbatch options of --submit, one string after '=', e.g. "
                       "--sbatch='--partition=gpu --gpus-per-task=1 --time=1:00:00'")
    slurm.add_argument("--max-parallel", type=int, metavar="N", help="--submit: at most N array tasks at once")
    slurm.add_argument("--task", type=int, metavar="K", help="run job K of the sweep only (what an array task runs: "
                       "--task $SLURM_ARRAY_TASK_ID); the task that finds every job finished writes the results")
    slurm.add_argument("--merge", action="store_true", help="write stitches_res.txt (and the pictures) from the "
                       "finished jobs, whoever ran them; list the unfinished ones")
    one = p.add_argument_group("one run (without --sweep)")
    one.add_argument("--front", metavar="[LABEL=]ANCHOR", help="NAME (timm), NAME:CHECKPOINT, FILE#INDEX of a stitch "
                     "config, or a JSON anchor object '{\"name\": ..., \"checkpoint\": ..., \"model_kwargs\": ...}'")
    one.add_argument("--end", metavar="[LABEL=]ANCHOR", help="the end anchor, the same way")
    one.add_argument("--cut", type=int, metavar="I", help="the front anchor's last block that runs (flat, from 0)")
    one.add_argument("--end-block", type=int, metavar="J", help="the end anchor's first block that runs")
    one.add_argument("--gap", type=int, metavar="G", help="J minus the block aligned with I (default 0)")
    one.add_argument("--layer", metavar="TYPE", help="stitching-layer type (default linear)")
    one.add_argument("--layer-option", type=_key_value, nargs="+", default=[], metavar="KEY=VALUE",
                     help="stitching-layer options, e.g. rank=8")
    one.add_argument("--no-ls-init", action="store_true", help="train the layer from its random init")
    one.add_argument("--ls-images", type=int, metavar="N", help="images of the least-squares init (default 256)")
    one.add_argument("--loss", choices=("ce", "kd"), help="ce (default) or kd from the end anchor's logits")
    one.add_argument("--temperature", type=float, metavar="T", help="kd temperature (default 1)")
    one.add_argument("--kd-alpha", type=float, metavar="A", help="kd weight (default 1: KL only)")
    one.add_argument("--seed", type=int, metavar="S", help="seed of the run and of the anchors' random init "
                     "(default 0)")
    one.add_argument("--no-pretrained", action="store_true", help="anchors without a checkpoint start random")
    p.set_defaults(fn=command)


_ONE_RUN = {"front": "--front", "end": "--end", "cut": "--cut", "end_block": "--end-block", "gap": "--gap",
            "layer": "--layer", "ls_images": "--ls-images", "loss": "--loss", "temperature": "--temperature",
            "kd_alpha": "--kd-alpha", "seed": "--seed"}


def sweep_from_args(args: argparse.Namespace) -> Sweep:
    """The sweep the command line asks for: --sweep FILE, or one run from the run flags."""
    train = dict(args.train)
    given = [flag for dest, flag in _ONE_RUN.items() if getattr(args, dest) is not None]
    given += [f for f, on in (("--no-ls-init", args.no_ls_init), ("--layer-option", args.layer_option),
                              ("--no-pretrained", args.no_pretrained)) if on]
    if args.sweep:
        if given:
            raise SweepError(f"{', '.join(given)} describe one run; with --sweep put them into the sweep file")
        sweep = load_sweep(args.sweep, args.out, args.data)
        sweep.train.update({k.replace("-", "_"): v for k, v in train.items()})
        for k in sweep.train:
            if k in TRAIN_REFUSED:
                raise SweepError(f"--train {k}: {TRAIN_REFUSED[k]}")
        return sweep
    if not (args.front and args.end and args.cut is not None):
        raise SweepError("give --sweep FILE, or one run: DATA --front ANCHOR --end ANCHOR --cut I [--gap G | "
                         "--end-block J] --out DIR")
    (fl, front), (el, end) = anchor_argument(args.front, "--front"), anchor_argument(args.end, "--end")
    if fl == el and front != end:  # two different anchors that would get one label
        el = f"{el}_end"
    anchors = {fl: front, el: end}
    run: dict[str, Any] = {"pair": [fl, el], "cut": args.cut}
    for dest in ("end_block", "gap", "ls_images", "loss", "temperature", "kd_alpha", "seed"):
        if getattr(args, dest) is not None:
            run[dest] = getattr(args, dest)
    if args.layer or args.layer_option:
        run["layer"] = {"type": args.layer or "linear", **dict(args.layer_option)}
    if args.no_ls_init:
        run["ls_init"] = False
    data = {"anchors": anchors, "train": train, "runs": [run], "pretrained": not args.no_pretrained,
            "seed": args.seed or 0}
    return parse_sweep(data, "stitch-train", Path.cwd(), args.out, args.data)


def _table(summary: SweepSummary) -> str:
    rows = ["| cfg_id | route | top-1 | init top-1 | FLOPs | params | layer params | s |",
            "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in summary.records:
        if "run" in r:
            rows.append(f"| {r['cfg_id']} | {r['route']} | {r['acc1']:.2f} | {r['init_acc1']:.2f} | "
                        f"{human(r['flops'])} | {human(r['params'])} | {human(r['stitch_layer_params'])} | "
                        f"{r['seconds']:.0f} |")
        else:
            rows.append(f"| {r['cfg_id']} | {r['route']} (anchor) | {r['acc1']:.2f} | | {human(r['flops'])} | "
                        f"{human(r['params'])} | | |")
    return "\n".join(rows) + "\n"


def command(args: argparse.Namespace) -> int:
    """`snnet stitch-train`. A user error is an SNNetError raised through: `snnet`'s main prints it in one line
    (rank 0 only) and exits with its code."""
    rank, world_size = _world()
    if not logging.getLogger().handlers:
        tag = f" [rank {rank}]" if world_size > 1 else ""
        logging.basicConfig(level=logging.INFO, format=f"%(asctime)s{tag} %(message)s", datefmt="%H:%M:%S")
    sweep = sweep_from_args(args)
    modes = [flag for flag, on in (("--submit", args.submit), ("--merge", args.merge),
                                   ("--task", args.task is not None), ("--dry-run", args.dry_run)) if on]
    if len(modes) > 1:
        raise SweepError(f"{' and '.join(modes)} exclude each other; give one")
    if (args.sbatch or args.max_parallel) and not args.submit:
        raise SweepError("--sbatch and --max-parallel are options of --submit; add --submit")
    if (args.submit or args.task is not None) and not args.sweep:
        raise SweepError("--submit and --task need --sweep FILE (the array tasks read the sweep file); write the run "
                         "into a sweep file")
    if args.max_parallel is not None and args.max_parallel < 1:
        raise SweepError(f"--max-parallel {args.max_parallel} must be >= 1")
    if args.submit:
        job, todo = submit_array(sweep, args)
        if job is None:
            print(f"every job of {sweep.source} is finished; nothing to submit (results: snnet stitch-train --sweep "
                  f"{args.sweep} --merge)")
        else:
            print(f"submitted job array {job}: {len(todo)} task(s), jobs {','.join(map(str, todo))} of the sweep; "
                  f"logs {sweep.out / 'slurm'}; the last task writes {sweep.out / 'stitches_res.txt'} (or: snnet "
                  f"stitch-train --sweep {args.sweep} --merge)")
        return 0
    if args.merge:
        path, missing = merge(sweep)
        print(f"{path}: every job finished" if not missing else
              f"{path}: jobs {','.join(map(str, missing))} not finished yet (rerun --submit for them)")
        return 0
    summary = run_sweep(sweep, dry_run=args.dry_run, task=args.task)
    if rank != 0:
        return 0
    n = len(sweep.runs)
    if args.dry_run:
        print(f"{n} runs, {len(summary.skipped)} finished, in {sweep.out}:")
        for r, p in zip(sweep.runs, summary.plans):
            state = "finished" if r.index in summary.skipped else "to do"
            print(f"  cfg {r.index:>3d} {state:<8} {p.route}  (gap {p.gap:+d}; runs/{p.name})")
        return 0
    if args.task is not None:
        print(f"job {args.task} of {sweep.source} done" + (f"; every job finished: results {summary.results_file}"
                                                             if summary.results_file else ""))
        return 0
    print(_table(summary), end="")
    print(f"{n} runs: {len(summary.trained)} trained now by this process, {len(summary.skipped)} finished before"
          + (f", {len(summary.elsewhere)} by other processes" if world_size > 1 else "")
          + f"; results {summary.results_file} (plot: snnet pareto {summary.results_file} --out {sweep.out})")
    return 0
