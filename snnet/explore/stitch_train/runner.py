"""One stitch-train sweep prepared, and one run trained and evaluated.

`prepare` checks every input before anything is written (train.py flags, data, anchors, every run's blocks,
resolution and stitching layer) and builds each anchor once. Anchors are built right after seeding torch, numpy and
random with the sweep's `seed` (each anchor reseeded, so its weights do not depend on which other anchors the sweep
builds): an anchor with neither checkpoint nor pretrained weights is then the same in every rerun and on every
torchrun rank. Each anchor's identity (spec, checkpoint sha256, and the sha256 of its weights as built) goes into the
hash that names a run's folder and the file of an anchor's cached evaluation, so a cached result is never stale.

`train_run` trains one run in this process with train.py's machinery: its trainer (trainer.py: optimizer and
schedule from the typed options, EMA, accumulation, compile, the epoch loop), loaders (snnet/data), losses
(losses.py), FLOPs (cost.py), exact parameter counts
(model.py), pickle-free checkpoints (checkpoint.py) and atomic files (fileio.py). It writes, in the run's folder,
``trajectory.jsonl`` (a line per optimizer step and per epoch, rewritten atomically after every epoch),
``stitch_layer.pth.tar`` and, last, ``result.json``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from timm.data import resolve_data_config
from timm.utils import random_seed

from snnet.data.checks import DataError, check_data
from snnet.data.datasets import create_datasets, num_classes_of
from snnet.data.loaders import create_eval_loader, create_train_loader
from snnet.data.ls_images import clean_images
from snnet.data.options import DataOptions, LoaderOptions
from snnet.explore.stitch_train.network import (
    AnchorProbe,
    Stitched,
    build_stitched,
    fit_stitch,
    probe_anchor,
    stitch_flops,
    stitch_state,
)
from snnet.explore.stitch_train.sweep import (
    FORMAT,
    TRAIN_DEFAULTS,
    RunSpec,
    Sweep,
    SweepError,
    aligned_block,
    layer_label,
)
from snnet.results.records import file_sha256, stitch_record
from snnet.stitching.adapter import AnchorAdapter, adapter_for
from snnet.stitching.build import create_anchor
from snnet.stitching.cost import cost_table
from snnet.stitching.model import PlainNet
from snnet.train.device import device_from_flag
from snnet.train.evaluator import evaluate_stitches
from snnet.train.losses import DistillationLoss, base_criterion
from snnet.train.options import (
    TRAINING_OPTIONS,
    EvalOptions,
    InputOptions,
    JobOptions,
    LoggerOptions,
    LossOptions,
    NetworkOptions,
    OptimOptions,
    OptionError,
    RunOptions,
    ScheduleOptions,
    TrainOptions,
    options_by_key,
)
from snnet.train.preflight import check_augmentation, check_output
from snnet.train.resolve import resolve
from snnet.train.trainer import EpochHooks, Trainer
from snnet.utils.checkpoint import save_checkpoint, state_sha256
from snnet.utils.fileio import write_text_atomic

_logger = logging.getLogger("snnet")
#: the option objects a sweep's `train` sets (train.py's flag names)
RUN_OPTIONS = (DataOptions, LoaderOptions, *TRAINING_OPTIONS)

RESULT, TRAJECTORY, LAYER_CKPT = "result.json", "trajectory.jsonl", "stitch_layer.pth.tar"
#: least-squares cutoff of the stitch's fit: None is LAPACK's machine-precision default, as train.py's
#: least-squares init (snnet/stitching/ls_init.py) uses
LS_RCOND = None


@dataclass
class RunPlan:
    """One run resolved against its anchors: the end block, its folder name and the hash that names it."""
    end_block: int
    aligned: int
    gap: int
    name: str
    spec_hash: str
    route: str
    size: tuple[int, int]
    ident: dict[str, Any]


@dataclass
class SweepSetup:
    """What every run of a sweep shares: options, data, anchors (built once, frozen) and their probes."""
    sweep: Sweep
    options: dict[type, Any]                    # option class -> the sweep's (TRAIN_DEFAULTS < its `train`)
    train_ds: Any
    val_ds: Any
    device: Any
    models: dict[str, Any]
    adapters: dict[str, AnchorAdapter]
    anchor_ids: dict[str, dict[str, Any]]       # label -> identity (spec + checkpoint and weight hashes)
    probes: dict[tuple[str, tuple[int, ...]], AnchorProbe] = field(default_factory=dict)
    plans: list[RunPlan] = field(default_factory=list)

    @property
    def data(self) -> DataOptions:
        return self.options[DataOptions]

    @property
    def loader(self) -> LoaderOptions:
        return self.options[LoaderOptions]

    @property
    def train(self) -> TrainOptions:
        return self.options[TrainOptions]

    def data_cfg(self, label: str) -> dict[str, Any]:
        return resolve_data_config(self.options[InputOptions].data_config_args(), model=self.models[label])

    def size(self, label: str) -> tuple[int, int]:
        return tuple(self.data_cfg(label)["input_size"][1:])

    def probe(self, label: str, size: tuple[int, int]) -> AnchorProbe:
        key = (label, tuple(size))
        if key not in self.probes:
            self.probes[key] = probe_anchor(self.models[label], self.adapters[label], label, size, self.in_chans)
        return self.probes[key]

    @property
    def in_chans(self) -> int:
        return self.options[InputOptions].in_chans or 3

    @property
    def train_recipe(self) -> dict[str, Any]:
        return {**TRAIN_DEFAULTS, **self.sweep.train}

    def build(self, run: RunSpec, plan_end_block: int, size: tuple[int, int]) -> Stitched:
        labels = (run.front, run.end)
        return build_stitched([self.models[l] for l in labels], [self.adapters[l] for l in labels], labels,
                              [self.probe(l, size) for l in labels], run.cut, plan_end_block, run.layer_spec)


def sweep_options(sweep: Sweep) -> dict[type, Any]:
    """The typed options of the sweep's runs, by keyword: train.py's defaults (the dataclasses') < TRAIN_DEFAULTS <
    the sweep's `train`, each key checked against the option fields and each value against its field's type."""
    try:
        options = options_by_key(RUN_OPTIONS, {**TRAIN_DEFAULTS, **sweep.train}, f"{sweep.source}: train",
                                 data_dir=str(sweep.data))
    except OptionError as e:
        raise SweepError(str(e)) from None
    # one process trains each run (the sweep spreads runs over processes)
    options[LoaderOptions] = replace(options[LoaderOptions], distributed=False)
    options[TrainOptions] = replace(options[TrainOptions], distributed=False)
    return options


def weights_sha256(model) -> str:
    """An anchor's identity as built (`snnet.utils.checkpoint.state_sha256` of its state dict)."""
    return state_sha256(model.state_dict())


def _anchor_identity(spec, model, sha_cache: dict[str, str]) -> dict[str, Any]:
    ident = {"name": spec.name, "model_kwargs": spec.model_kwargs, "checkpoint": spec.checkpoint}
    if spec.checkpoint and Path(spec.checkpoint).is_file():
        if spec.checkpoint not in sha_cache:
            sha_cache[spec.checkpoint] = file_sha256(spec.checkpoint)
        ident["checkpoint_sha256"] = sha_cache[spec.checkpoint]
    ident["weights_sha256"] = weights_sha256(model)
    return ident


def prepare(sweep: Sweep) -> SweepSetup:
    """Every input checked, before anything is written: train.py flags, data, anchors (seeded, built and loaded
    once), every run's blocks, resolution and stitching layer."""

    options = sweep_options(sweep)
    check_output(sweep.out)
    data, given = options[DataOptions], options[InputOptions]
    check_data(data, need_train=True, world_size=1)
    check_augmentation(options[LoaderOptions], given.img_size or 224)
    train_ds, val_ds = create_datasets(data, need_train=True)
    if val_ds is None:
        raise DataError(f"data folder {data.data_dir!r} has no val/ (or validation/) split; stitch-train validates "
                        f"every epoch: add one")
    num_classes = data.num_classes if data.num_classes is not None else num_classes_of(train_ds)
    options[LossOptions] = replace(options[LossOptions], num_classes=num_classes)
    # torchrun: this process's cuda:LOCAL_RANK (each process trains its own runs)
    device = device_from_flag(options[TrainOptions].device, per_rank=True)
    options[TrainOptions] = replace(options[TrainOptions], device=str(device))
    used = sorted({r.front for r in sweep.runs} | {r.end for r in sweep.runs}, key=list(sweep.anchors).index)
    kwargs = {k: v for k, v in (("img_size", given.img_size), ("in_chans", given.in_chans)) if v is not None}
    models: dict[str, Any] = {}
    adapters: dict[str, AnchorAdapter] = {}
    idents: dict[str, dict[str, Any]] = {}
    shas: dict[str, str] = {}
    for label in used:
        spec = sweep.anchors[label]
        # seeded right before each anchor is built: a random init is the same in every rerun, on every rank, and
        # whichever other anchors the sweep builds
        random_seed(sweep.seed, 0)
        model = create_anchor(spec, pretrained=sweep.pretrained, num_classes=num_classes, **kwargs)
        idents[label] = _anchor_identity(spec, model, shas)  # on the CPU, once per anchor
        model.to(device).eval()
        for p in model.parameters():
            p.requires_grad = False
        models[label], adapters[label] = model, adapter_for(model, label)
    prep = SweepSetup(sweep, options, train_ds, val_ds, device, models, adapters, idents)
    seen: dict[str, int] = {}
    for run in sweep.runs:
        plan = plan_run(prep, run)
        if plan.spec_hash in seen:  # e.g. gap 0 and end_block = the aligned block
            raise SweepError(f"{sweep.source}: runs {seen[plan.spec_hash]} and {run.index} are the same run "
                             f"({plan.route}); remove one")
        seen[plan.spec_hash] = run.index
        prep.plans.append(plan)
    return prep


def run_hash(prep: SweepSetup, run: RunSpec, end_block: int) -> tuple[str, dict[str, Any]]:
    """(sha256, identity) of a run: both anchors' identities (weights included), the cut, the layer, the loss, the
    run's seed, the data folder and the recipe. It names the run's folder: a changed run never reuses a result."""
    ident = {"format": FORMAT, "front": prep.anchor_ids[run.front], "end": prep.anchor_ids[run.end],
             "cut": run.cut, "end_block": end_block, "layer": run.layer_spec, "ls_init": run.ls_init,
             "ls_images": run.ls_images if run.ls_init else None, "loss": run.loss,
             "temperature": run.temperature if run.loss == "kd" else None,
             "kd_alpha": run.kd_alpha if run.loss == "kd" else None, "seed": run.seed,
             "data": os.path.abspath(prep.data.data_dir), "train": prep.train_recipe,
             "pretrained": prep.sweep.pretrained}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest(), ident


def plan_run(prep: SweepSetup, run: RunSpec) -> RunPlan:
    where = f"{prep.sweep.source}: run {run.index}"
    size = prep.size(run.front)
    fp, ep = prep.probe(run.front, size), prep.probe(run.end, size)
    if run.cut >= fp.depth:
        raise SweepError(f"{where}: cut {run.cut} is past the last block of {run.front!r}; use 0..{fp.depth - 1}")
    aligned = aligned_block(run.cut, fp.depth, ep.depth)
    j = run.end_block if run.end_block is not None else aligned + (run.gap or 0)  # parse_sweep sets one
    if not 0 <= j <= ep.depth:
        what = f"end_block {j}" if run.end_block is not None else f"gap {run.gap} (end block {aligned} + {run.gap})"
        raise SweepError(f"{where}: {what} is outside the blocks of {run.end!r}, 0..{ep.depth} ({ep.depth}: only its "
                         f"norm and head); pick another gap or cut")
    try:
        prep.build(run, j, size)  # refuses what cannot be stitched, before anything runs
    except SweepError as e:
        raise SweepError(f"{where}: {e}") from None
    spec_hash, ident = run_hash(prep, run, j)
    label = layer_label(run.layer_spec) + ("" if run.ls_init else "_nols") + \
        (f"_kd-t{run.temperature:g}-a{run.kd_alpha:g}" if run.loss == "kd" else "")
    name = f"{run.front}-{run.end}_i{run.cut}_j{j}_{label}_s{run.seed}_{spec_hash[:8]}"
    route = f"{run.front}[..b{run.cut}] -({label.replace('_', ' ')})-> {run.end}[b{j}..]"
    return RunPlan(j, aligned, j - aligned, name, spec_hash, route, size, ident)


# ---------------------------------------------------------------------------------------------------- one run
class _TrackedLoss:
    """The run's loss function, also keeping each step's loss and top-1 hits (for the trajectory) and the epoch's."""

    def __init__(self, loss_fn):
        self.loss_fn = loss_fn
        self.step = [0.0, 0, 0, 0]   # loss sum over micro-batches, micro-batches, hits, samples
        self.epoch = [0, 0]          # hits, samples

    def __call__(self, x, out, y):
        loss = self.loss_fn(x, out, y)
        logits = out[0] if isinstance(out, (tuple, list)) else out
        hits = int((logits.detach().argmax(dim=1) == y).sum())
        self.step = [self.step[0] + float(loss.detach()), self.step[1] + 1, self.step[2] + hits,
                     self.step[3] + y.shape[0]]
        self.epoch = [self.epoch[0] + hits, self.epoch[1] + y.shape[0]]
        return loss

    def take_step(self) -> tuple[float, float]:
        loss, n, hits, samples = self.step
        self.step = [0.0, 0, 0, 0]
        return loss / max(n, 1), 100.0 * hits / max(samples, 1)


def _loss_fn(run: RunSpec, loss: LossOptions, teacher):
    base = base_criterion(False, loss.smoothing)
    if run.loss == "ce":
        return DistillationLoss(base, None, "none")
    return DistillationLoss(base, teacher, "soft", run.kd_alpha, run.temperature)


class _Trajectory:
    """trajectory.jsonl: one JSON line per optimizer step and per epoch (and the initial evaluation), rewritten
    atomically whenever an epoch ends, so the file always holds whole lines of finished steps."""

    def __init__(self, path: Path, t0: float):
        self.path, self.t0 = path, t0
        self.lines: list[str] = []

    def add(self, kind: str, **values) -> dict[str, Any]:
        rec = {"kind": kind, **values, "time": round(time.perf_counter() - self.t0, 4)}
        self.lines.append(json.dumps(rec))
        return rec

    def flush(self) -> None:
        write_text_atomic(self.path, "".join(line + "\n" for line in self.lines))


class RunTrajectory(EpochHooks):
    """stitch-train's epochs around the trainer's: each optimizer step and epoch into the run's trajectory, the
    stitch validated after every epoch (the EMA's weights when on)."""

    def __init__(self, trainer: Trainer, tracked: _TrackedLoss, traj: _Trajectory, evaluate, label: str,
                 init: dict[str, float]):
        self.trainer, self.tracked, self.traj, self.evaluate, self.label = trainer, tracked, traj, evaluate, label
        self.epoch, self.started_at, self.val = 0, 0.0, init  # the epoch running, its start, the last validation
        trainer.after_step.append(self.log_step)

    def log_step(self, global_step: int) -> None:
        loss, acc = self.tracked.take_step()
        self.traj.add("step", epoch=self.epoch + 1, step=global_step, lr=self.trainer.current_lr, loss=loss,
                      train_acc1=acc)

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.started_at = epoch, time.perf_counter()
        self.tracked.epoch = [0, 0]

    def validate(self, epoch: int, train_metrics: dict) -> tuple[dict, float | None]:
        self.val = self.evaluate()
        return self.val, self.val["acc1"]

    def end_epoch(self, epoch: int, train_metrics: dict, metrics: dict, lr: float) -> None:
        hits, samples = self.tracked.epoch
        self.traj.add("epoch", epoch=epoch + 1, step=self.trainer.state.global_step, lr=lr, loss=train_metrics["loss"],
                      train_acc1=100.0 * hits / max(samples, 1), val_loss=metrics["loss"], val_acc1=metrics["acc1"],
                      val_acc5=metrics["acc5"], epoch_time=round(time.perf_counter() - self.started_at, 4))
        self.traj.flush()
        _logger.info(f"{self.label} epoch {epoch + 1}/{len(self.trainer.epochs)}: train loss "
                     f"{train_metrics['loss']:.4f}, val top-1 {metrics['acc1']:.2f}")


def run_options(options: dict[type, Any], train: TrainOptions) -> RunOptions:
    """A sweep's typed options (`sweep_options`) with this run's loop options, as the trainer reads them."""
    return RunOptions(JobOptions(), options[DataOptions], options[LoaderOptions], options[OptimOptions],
                      options[ScheduleOptions], options[LossOptions], train, options[EvalOptions],
                      options[InputOptions], NetworkOptions(), LoggerOptions())


def train_run(prep: SweepSetup, run: RunSpec, plan: RunPlan, run_dir: Path, rank: int = 0,
              world_size: int = 1) -> dict[str, Any]:
    """Train and evaluate one run in this process; writes its folder (result.json last) and returns the result."""
    train = replace(prep.train, seed=run.seed)  # the run's seed: its stitch's init, its epochs' draws
    started, t0 = time.strftime("%Y-%m-%dT%H:%M:%S"), time.perf_counter()
    random_seed(run.seed, 0)  # rank 0 on every rank: a run is the same whichever process trains it
    size = plan.size
    st = prep.build(run, plan.end_block, size)  # the stitch's random init, from the run's seed
    net = st.net.to(prep.device)
    data_cfg = prep.data_cfg(run.front)
    run_dir.mkdir(parents=True, exist_ok=True)
    traj = _Trajectory(run_dir / TRAJECTORY, t0)

    ls_error = None
    if run.ls_init:
        ls_error, _ = fit_stitch(st, clean_images(prep.train_ds, data_cfg, run.ls_images, run.seed), prep.device,
                                 LS_RCOND)
    # one process trains the whole run (the sweep spreads runs over processes): no DDP, rank 0's seeds
    options = resolve(run_options(prep.options, replace(train, device=str(prep.device))), world_size=1)
    amp_dtype = options.amp_dtype
    loader = create_train_loader(prep.train_ds, prep.loader, data_cfg, prep.device)
    val_loader = create_eval_loader(prep.val_ds, prep.loader, data_cfg)
    tracked = _TrackedLoss(_loss_fn(run, prep.options[LossOptions], prep.models[run.end]))
    trainer = Trainer(net, loader, tracked, options, lambda step: 0, input_size=(prep.in_chans, *size))
    num_epochs, lr = len(trainer.epochs), trainer.lr

    def evaluate() -> dict[str, float]:  # the EMA's weights when model_ema is on
        return evaluate_stitches(trainer.eval_model, val_loader, [0], prep.device, amp_dtype, train.log_interval)[0]

    init = evaluate()
    traj.add("init", epoch=0, step=0, lr=None, val_loss=init["loss"], val_acc1=init["acc1"], val_acc5=init["acc5"],
             ls_rel_error=ls_error)
    traj.flush()
    _logger.info(f"cfg {run.index} {plan.route}: init top-1 {init['acc1']:.2f}" +
                 (f" (LS fit error {ls_error:.4f})" if ls_error is not None else " (no LS init)") +
                 f"; {num_epochs} epochs of {trainer.steps_per_epoch} steps, lr {lr:.2e}" +
                 (f", EMA decay {train.model_ema_decay}" if trainer.ema is not None else ""))
    hooks = RunTrajectory(trainer, tracked, traj, evaluate, f"cfg {run.index}", init)
    train_metrics = trainer.fit(hooks)
    val = hooks.val
    trainer.use_ema_weights()  # the result, its record and stitch_layer.pth.tar are the EMA's when it is on

    table = cost_table(net, size, prep.in_chans)
    layer_flops = stitch_flops(st, table)
    layer_params = sum(p.numel() for p in st.stitch.parameters())
    trainable = sum(p.numel() for p in st.stitch.parameters() if p.requires_grad)
    fp, ep = prep.probe(run.front, size), prep.probe(run.end, size)
    result = {
        "format": FORMAT, "cfg_id": run.index, "run": plan.name, "spec_hash": plan.spec_hash,
        "route": plan.route, "front": {"label": run.front, **prep.anchor_ids[run.front], "depth": fp.depth},
        "end": {"label": run.end, **prep.anchor_ids[run.end], "depth": ep.depth},
        "cut": run.cut, "end_block": plan.end_block, "aligned_end_block": plan.aligned, "gap": plan.gap,
        "cut_points": {"front": st.front.to_json(), "end": st.end.to_json()},
        "layer": st.stitch.layer.spec(), "layer_type": run.layer_spec["type"],
        "prefix_tokens": st.stitch.end_prefix, "ls_init": run.ls_init,
        "ls_images": run.ls_images if run.ls_init else None, "ls_rel_error": ls_error, "loss": run.loss,
        "temperature": run.temperature, "kd_alpha": run.kd_alpha, "seed": run.seed, "anchor_seed": prep.sweep.seed,
        "params": net.params(0), "stitch_layer_params": layer_params, "stitch_layer_trainable_params": trainable,
        "flops": table.route_flops(net.routes[0]), "stitch_layer_flops": layer_flops,
        "img_size": list(size), "epochs": num_epochs, "steps": trainer.state.global_step, "lr": lr,
        "train": prep.train_recipe, "data": os.path.abspath(prep.data.data_dir),
        "acc1": val["acc1"], "acc5": val["acc5"], "val_loss": val["loss"], "train_loss": train_metrics["loss"],
        "init_acc1": init["acc1"], "init_acc5": init["acc5"], "init_val_loss": init["loss"],
        "rank": rank, "world_size": world_size, "device": str(prep.device),
        "started": started, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "seconds": round(time.perf_counter() - t0, 3), "trajectory": TRAJECTORY, "checkpoint": LAYER_CKPT}
    # the results-file record, from the one builder every tool uses (route, FLOPs, params, images and their size)
    result["record"] = stitch_record(
        net, 0, val, result["flops"], size, cfg_id=run.index, route=plan.route, run=plan.name, front=run.front,
        end=run.end,
        cut=run.cut, end_block=plan.end_block, gap=plan.gap, layer=layer_label(run.layer_spec), ls_init=run.ls_init,
        objective=run.loss, init_acc1=init["acc1"], stitch_layer_params=layer_params, seconds=result["seconds"])
    save_checkpoint(run_dir / LAYER_CKPT, {"state_dict": stitch_state(st), "spec": json.dumps(st.stitch.layer.spec()),
                                           "cut_points": json.dumps(result["cut_points"]), "route": plan.route,
                                           "epoch": num_epochs - 1, "global_step": trainer.state.global_step,
                                           "config": json.dumps(plan.ident)})
    write_text_atomic(run_dir / RESULT, json.dumps(result, indent=1) + "\n")  # last: the run is finished
    return result


def evaluate_anchor(prep: SweepSetup, label: str) -> dict[str, Any]:
    """An anchor on its own (top-1, FLOPs, params), for the results file's reference points."""
    net = PlainNet(prep.models[label], label)
    data_cfg = prep.data_cfg(label)
    m = evaluate_stitches(net, create_eval_loader(prep.val_ds, prep.loader, data_cfg), [0], prep.device,
                          log_interval=prep.train.log_interval)[0]
    size = tuple(data_cfg["input_size"][1:])
    flops = cost_table(net, size, prep.in_chans).route_flops(net.routes[0])
    # cfg_id: the anchor's place in the results file, set when the file is collected
    record = stitch_record(net, 0, m, flops, size, route=label, anchor=label)
    return {"label": label, **prep.anchor_ids[label], "acc1": m["acc1"], "acc5": m["acc5"], "loss": m["loss"],
            "flops": flops, "params": net.params(0), "img_size": list(size),
            "data": os.path.abspath(prep.data.data_dir),
            "record": record}
