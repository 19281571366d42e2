"""Every input of a run checked before any work: arguments and configs (parsed), the output folder, the checkpoints,
the data layout, the augmentation. A bad input is one line and exit 2 before a weight is loaded or an image read.

train.py runs these checks first, identically on every rank; distributed_train.sh runs them once before torchrun
starts its processes (``python -m snnet.train.preflight NUM_PROC ARGS``), so a bad input under torchrun is one line from
one process, not one per rank followed by torchrun's traceback.

Every check takes typed values: `check_run` and `check_recipe` the run's resolved `RunOptions`, `check_output` a
folder, `check_augmentation` the `LoaderOptions` and an input size. What
a check builds to see that it can be built (the network on the meta device, the sampler, the LR schedule, the eval
data config) it builds with the function the run itself uses, from the layers below: nothing here calls back up
into train.py's entry modules. Only this module's own command line (`main`) parses arguments.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from timm.data import create_transform

from snnet.data.checks import WARNED_ENV, check_data
from snnet.data.options import LoaderOptions
from snnet.data.transforms import eval_data_config, timm_crop_mode
from snnet.stitching.build import anchor_weights, check_model_name, create_anchor
from snnet.stitching.config import AnchorSpec, StitchConfig, check_same_network
from snnet.stitching.model import RoutedNet
from snnet.stitching.weights import WeightsUnavailable, check_pretrained
from snnet.train.args import set_by
from snnet.train.device import device_from_flag
from snnet.train.evaluator import panel_cfg_ids, prediction_ids
from snnet.train.network import build_network, check_train_exclude
from snnet.train.optim import check_optimizer_name
from snnet.train.options import LossOptions, RunOptions, TrainOptions
from snnet.train.resolve import resolve
from snnet.train.resume import fitting_checkpoint
from snnet.train.sampler import anchor_routes, run_sampler
from snnet.utils import slurm
from snnet.utils.checkpoint import (
    LAST,
    RECOVERY,
    CheckpointError,
    classifier_keys,
    fit_report,
    json_field,
    load_checkpoint,
)
from snnet.utils.distributed import usable_cores, world
from snnet.utils.errors import SNNetError, UsageError, one_line
from snnet.utils.fileio import lock_holder, unwritable


class OutputError(SNNetError):
    """An output folder that cannot be written; the message names it and the fix."""


def check_output(path: Path) -> None:
    """`path` can be made and written (`unwritable`), and no other run holds it."""
    reason = unwritable(path)
    if reason:
        raise OutputError(f"output folder {str(path)!r} {reason}; pass another --output/--experiment")
    # said here too: distributed_train.sh's check runs before torchrun starts. Only rank 0 (or that one-process
    # check) asks: rank 0 takes the lock (train.main.run), and another rank of the same launch checking after it
    # would see its own run's lock as another run's (a race that refused rank 1 and hung torchrun restarts)
    holder = lock_holder(path) if world(launched=True)[0] == 0 else None
    if holder is not None:
        raise OutputError(f"folder {str(path)!r} is in use by another run ({holder}); wait for it to end or pass "
                          f"another --output/--experiment")


def restarted() -> bool:
    """Whether this process belongs to a restarted run (torchrun's restart of its workers, or a requeued Slurm job,
    whose batch script checks the run again): it continues the run's own checkpoint."""
    return os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0" or slurm.restart_count() > 0


def check_fresh_output(path: Path) -> None:
    """A run that starts training from nothing (no --resume, nothing for --auto-resume to continue) into a folder
    that holds a training run's checkpoint would replace it at its first epoch: refused, naming the ways on."""
    found = [name for name in (RECOVERY, LAST) if (path / name).exists()]
    if found:
        raise OutputError(f"output folder {str(path)!r} holds a training run's {found[0]}: a new run would replace "
                          f"it; add --auto-resume to continue that run, or pass another --experiment (or move the "
                          f"folder away)")


def check_checkpoints(options: RunOptions, stitch_cfg: StitchConfig | None = None) -> tuple[list[str], str] | None:
    """--resume and --initial-checkpoint are readable pickle-free checkpoints, read lazily (keys, shapes and the
    recorded fields; their fit to the network is checked on the meta-device network, `check_structure`); a --resume
    checkpoint that recorded its stitch config was made with the network the given config builds (a field such as
    skip_final_norm changes the network without changing a weight's shape, so the state dict alone would load and
    run another network). Returns the class names the --resume checkpoint recorded and its path (None: it recorded
    none), which the data must have: resuming, index i still names the class it named in training."""
    job, loss = options.job, options.loss
    trained = None
    for path in (job.resume, job.initial_checkpoint):
        if not path:
            continue
        state = load_checkpoint(path, lazy=True)
        _check_classes(options.network.num_classes, path, state)
        names = (json_field(state, "args") or {}).get("class_names")
        if path == job.resume and isinstance(names, list) and all(isinstance(n, str) for n in names):
            trained = (names, path)
        if path == job.resume and not job.eval:
            _check_epochs_left(options, state)
            _check_optimizer(options, path, state)
        if path != job.resume or stitch_cfg is None:
            continue
        check_same_network(stitch_cfg, state, path, str(job.stitch_config), "pass the config it was trained with")
    if loss.teacher_checkpoint and loss.distillation_type != "none" and not job.eval:
        _check_teacher_checkpoint(loss)
    return trained


def _check_optimizer(options: RunOptions, path: str, state: dict) -> None:
    """A --resume checkpoint's optimizer state is of the optimizer this run builds (its recorded --opt): another
    one's state does not load (SGD's has no Adam step counts) or would load as the wrong moments."""
    recorded = (json_field(state, "args") or {}).get("opt")
    opt = options.optim.opt
    if options.train.no_resume_opt or "optimizer" not in state or not isinstance(recorded, str) or \
            recorded.lower() == opt.lower():
        return
    raise CheckpointError(f"checkpoint {path!r} holds the state of --opt {recorded}, this run builds --opt {opt} "
                          f"(set by {set_by('opt')}); resume with --opt {recorded}, or pass --no-resume-opt to start "
                          f"{opt} afresh from its weights and epoch")


def _check_classes(num_classes: int | None, path: str, state: dict) -> None:
    """--num-classes against the classes a checkpoint was trained for (its recorded arguments), named by its
    classifier's shape: said first (before the epochs it finished, say), as the network could not load it."""
    recorded = (json_field(state, "args") or {}).get("num_classes")
    if not num_classes or not isinstance(recorded, int) or recorded == num_classes:
        return
    heads = [f"{k} {tuple(v.shape)}" for k, v in state.get("state_dict", {}).items()
             if getattr(v, "ndim", 0) >= 1 and v.shape[0] == recorded and k.rsplit(".", 1)[-1] == "weight"
             and any(p in k for p in ("head", "classifier", "fc."))][:2]
    source = set_by("num_classes")  # typed, or a stitch config's num_classes
    if source == "the command line":
        given, fix = f"--num-classes {num_classes} given", f"pass --num-classes {recorded}, or drop --num-classes"
    else:
        given, fix = f"num_classes {num_classes} of {source}", f"set it to {recorded} there, or pass --num-classes " \
                                                               f"{recorded}"
    raise CheckpointError(f"checkpoint {path!r} has a classifier for {recorded} classes "
                          f"({', '.join(heads) or 'its head'}), not the {given}; {fix}")


def _check_teacher_checkpoint(loss: LossOptions) -> None:
    """--teacher-checkpoint: a readable pickle-free checkpoint whose keys and shapes fit the teacher (compared with
    the teacher's meta-device structure: no weight is allocated; the classifier only where --num-classes is given,
    as the data decides its size otherwise)."""
    state = load_checkpoint(loss.teacher_checkpoint, "--teacher-checkpoint")["state_dict"]
    teacher = create_anchor(AnchorSpec(loss.teacher), pretrained=False, structure_only=True,
                            num_classes=loss.num_classes)
    own = teacher.state_dict()
    if loss.num_classes is None:  # the head's size is the data's: compare the rest
        names = classifier_keys(teacher)
        own, state = ({k: v for k, v in d.items() if k not in names} for d in (own, state))
    report = fit_report(own, state)
    if report:
        raise CheckpointError(f"--teacher-checkpoint {loss.teacher_checkpoint!r} does not fit the teacher "
                              f"{loss.teacher!r} ({report}); pass the teacher's own checkpoint or its --teacher NAME")


def _check_epochs_left(options: RunOptions, state: dict) -> None:
    """A finished run resumed into another folder would train no epoch and then look there for the last.pth.tar it
    never wrote. (In its own folder, a finished run goes on to its final evaluation: a restart after the last epoch.)"""
    resume, epochs, start = options.job.resume, options.schedule.epochs, options.train.start_epoch
    if start is None:
        start = int(state.get("epoch", -1)) + (0 if "batch_idx" in state else 1)
    if start < epochs or Path(resume).resolve().parent == options.out_dir.resolve():
        return
    raise UsageError(f"--resume {resume!r} finished epoch {start} of --epochs {epochs}: no epoch is left to "
                     f"train into {str(options.out_dir)!r}; raise --epochs, or evaluate it with --eval --resume")


def check_augmentation(loader: LoaderOptions, input_size: int | Sequence[int] = 224) -> None:
    """The training transform can be built at `input_size` (e.g. --aa names a policy timm knows)."""
    if isinstance(loader.color_jitter, (int, float)) and loader.color_jitter < 0:
        raise UsageError(f"--color-jitter {loader.color_jitter:g}: must be >= 0 (0: no color jitter)")
    try:
        create_transform(input_size, is_training=True, auto_augment=loader.aa, re_prob=loader.reprob,
                         re_mode=loader.remode, re_count=loader.recount, scale=loader.scale, ratio=loader.ratio,
                         hflip=loader.hflip, vflip=loader.vflip, color_jitter=loader.color_jitter,
                         interpolation=loader.train_interpolation,
                         train_crop_mode=timm_crop_mode(loader.train_crop_mode))
    except Exception as e:  # timm asserts on unknown policies and ranges
        reason = " ".join(str(e).split())[:160] or type(e).__name__
        raise UsageError(f"the training augmentation cannot be built ({reason}); check --aa (e.g. "
                         f"rand-m9-mstd0.5-inc1), --scale, --ratio and --train-interpolation") from None


def check_run(options: RunOptions, stitch_cfg: StitchConfig | None, anchor_checkpoints: bool = False,
              locked: bool = False) -> None:
    """Every input of the run (`options` as resolved). `anchor_checkpoints`: the anchors' checkpoints fitted too,
    by their keys and shapes (the launcher's check and train.py's). `locked`: the run's folder is already checked
    (`check_output`) and locked by the caller (train.py checks under its lock: a probe of the lock here would
    release it)."""
    check_combinations(options)  # first: what the options say together, before any file is looked at
    device = device_from_flag(options.train.device)  # a name that is no torch device, or CUDA where there is none
    if not locked:
        check_output(options.out_dir)
    if not options.job.eval and not options.job.resume and not restarted():
        check_fresh_output(options.out_dir)
    trained = check_checkpoints(options, stitch_cfg)
    try:
        check_data(options.data, need_train=not options.job.eval, world_size=options.world_size, trained=trained)
    except SNNetError as e:  # the data layer names --num-classes; a stitch config's num_classes is fixed there
        source, wanted = set_by("num_classes"), options.data.num_classes
        if f"--num-classes {wanted} " not in str(e) or source == "the command line":
            raise
        raise type(e)(f"{e} (num_classes {wanted} comes from {source}: change it there, or pass --num-classes)") \
            from None
    _check_build(options, stitch_cfg, anchor_checkpoints, device.type)


def check_combinations(options: RunOptions) -> None:
    """What several options say together, refused by name (a single value's range is its field's rule or choices,
    which the parser checks): numbers timm and torch accept without a word but that would change the run, and
    options that need another one. One function over the run's options; the launcher's check, train.py's and
    --dry-run's call it first."""
    optim, schedule, loss, train, loader, job = (options.optim, options.schedule, options.loss, options.train,
                                                 options.loader, options.job)
    shown = lambda values: " ".join(map(str, values))

    def refuse(flag: str, value, why: str) -> None:
        raise UsageError(f"{flag} {value}: {why}")

    for flag, pair in (("--scale", loader.scale), ("--ratio", loader.ratio)):
        if pair is not None and (pair[0] > pair[1] or pair[0] <= 0):
            refuse(flag, shown(pair), "must be MIN MAX with 0 < MIN <= MAX")
    if train.model_ema and train.model_ema_decay >= 1:
        refuse("--model-ema-decay", train.model_ema_decay, "must be below 1 (at 1 the EMA never moves from the start)")
    channels = options.input.in_chans or 3
    for flag, values in (("--mean", options.input.mean), ("--std", options.input.std)):
        if values is not None and len(values) not in (1, channels):
            refuse(flag, shown(values), f"give 1 or {channels} values (one per input channel)")
    if schedule.sched in ("step", "multistep") and schedule.decay_epochs <= 0:
        refuse("--decay-epochs", schedule.decay_epochs, f"must be > 0 with --sched {schedule.sched}")
    betas = optim.opt_betas
    if betas is not None and (len(betas) not in (1, 2) or not all(0 <= b < 1 for b in betas)):
        refuse("--opt-betas", shown(betas), "give one or two betas in [0, 1), e.g. 0.9 0.999")
    if train.start_epoch is not None and not job.eval and not 0 <= train.start_epoch < schedule.epochs:
        refuse("--start-epoch", train.start_epoch, f"leaves no epoch to train of --epochs {schedule.epochs}; use 0.."
                                                   f"{schedule.epochs - 1}, or raise --epochs")
    if train.split_bn and not (loader.aug_splits > 1 or loader.resplit):
        raise UsageError("--split-bn needs --aug-splits > 1 or --resplit (timm's rule); add --resplit")
    if train.split_bn and loader.aug_splits < 2 and loader.batch_size % 2:
        raise UsageError(f"-b/--batch-size {loader.batch_size} with --split-bn and no --aug-splits: split-BN halves "
                         f"each batch (timm: 2 parts), so it must be even; give -b {loader.batch_size + 1}")
    if (job.auto_resume or restarted()) and not job.experiment and not job.eval:
        raise UsageError("--auto-resume (and torchrun --max-restarts, a requeued Slurm job) needs --experiment NAME, "
                         "so that a restarted run finds its own checkpoint")
    if train.freeze_anchors and not job.stitch_config and not job.eval:
        raise UsageError("--freeze-anchors with a plain --model leaves nothing to train (it has no stitching layers); "
                         "drop --freeze-anchors or give --stitch_config")
    if train.torchcompile:
        import torch._dynamo
        backends = torch._dynamo.list_backends(exclude_tags=())
        if train.torchcompile not in backends:
            raise UsageError(f"--torchcompile {train.torchcompile!r} is not a torch.compile backend here; use one of "
                             f"{', '.join(sorted(backends))}")
        if train.grad_checkpointing:
            raise UsageError("--torchcompile with --grad-checkpointing: a compiled route recomputes its "
                             "checkpointed blocks with other random numbers (drop-path) than the forward pass drew; "
                             "drop one of them")
    if loss.distillation_type != "none" and not loss.teacher:
        raise UsageError(f"--distillation-type {loss.distillation_type} needs --teacher NAME")


def check_sync_bn(train: TrainOptions, world_size: int, device_type: str | None = None,
                  num_configs: int | None = None) -> None:
    """--sync-bn's needs in a training run of `world_size` processes (one process: nothing to synchronise): CUDA
    devices (`device_type`), and --sample-sync where the network has several stitches (`num_configs`); either
    unknown (None) is not checked. Called once, by `check_structure` (the launcher's check and each rank's)."""
    if not train.sync_bn or world_size <= 1:
        return
    if num_configs is not None and num_configs > 1 and not train.sample_sync:
        raise UsageError("--sync-bn needs --sample-sync: SyncBatchNorm communicates inside every BatchNorm layer, so "
                         "all processes must train the same stitch each step; add --sample-sync")
    if device_type is not None and device_type != "cuda":
        raise UsageError(f"--sync-bn needs CUDA devices: torch's SyncBatchNorm does not run on {device_type}; drop "
                         f"--sync-bn (--dist-bn reduce averages BatchNorm statistics after each epoch instead)")


def check_recipe(options: RunOptions, stitch_cfg: StitchConfig | None, anchor_checkpoints: bool = False,
                 device_type: str | None = None) -> RoutedNet | None:
    """The checks that need no data folder, device or file of this machine (augmentation, optimizer, schedule,
    teacher): `--dry-run`, which resolves a run for another machine, runs these too. `device_type`: this machine's,
    for the checks that need it (None: a dry run's, not checked). Returns the network `check_structure` built."""
    check_combinations(options)
    return _check_build(options, stitch_cfg, anchor_checkpoints, device_type)


def _check_build(options: RunOptions, stitch_cfg: StitchConfig | None, anchor_checkpoints: bool = False,
                 device_type: str | None = None) -> RoutedNet | None:
    """What the run builds late (augmentation, optimizer and schedule, teacher, the network's structure), refused
    before any work."""
    if not options.job.eval:
        check_augmentation(options.loader, eval_data_config(options.values(), stitch_cfg)["input_size"])
    check_training(options, stitch_cfg)
    return check_structure(options, stitch_cfg, anchor_checkpoints, device_type)


def check_structure(options: RunOptions, stitch_cfg: StitchConfig | None, anchor_checkpoints: bool = False,
                    device_type: str | None = None) -> RoutedNet | None:
    """The network built as the run builds it, on the meta device (no weight read, downloaded or allocated): model
    arguments timm refuses, anchors that cannot be stitched at this input size, a positions selection asking for
    more positions than a pair has, routes `train_exclude` names that the network lacks, and anchor checkpoints that
    are missing or do not fit their anchors (`anchor_checkpoints`) (a wrong embed_dim, a config without the
    input_size they were trained at; the classifier too when the number of classes is given), cfg_ids the network
    lacks (`check_cfg_ids`), and a --resume or --initial-checkpoint that does not fit the network (another image
    size, model, config: its keys and shapes, no weight read; the classifier too when the number of classes is
    given). Returns that meta-device network (None: a plain --model run, or positions chosen from data)."""
    check_hub_weights(options, stitch_cfg)
    known = options.network.num_classes or (stitch_cfg.get("num_classes") if stitch_cfg is not None else None)
    net, cfg = build_network(replace(options.network_to_build(), num_classes=known or 1000), stitch_cfg,
                             structure_only=True)
    if net is not None:
        check_train_exclude(net, cfg)
    if net is not None and cfg is not None and not options.job.eval:
        check_sampling(options, net, cfg)
    if not options.job.eval:
        check_sync_bn(options.train, options.world_size, device_type, net.num_configs if net is not None else None)
    if anchor_checkpoints and net is not None and cfg is not None:  # what each rank loads first fits its anchor
        for i, spec in enumerate(cfg.anchors):
            if spec.checkpoint is not None:
                anchor_weights(net.anchor(i), spec, check_only=True, skip_head=known is None)
    if net is None:  # positions the run selects from data: the network is known only then
        return None
    check_cfg_ids(options, net)
    if options.job.dry_run or options.train.split_bn:  # no file of this machine; split BN's aux BatchNorms are
        return net  # made by the run's conversion only
    for path in (options.job.resume, options.job.initial_checkpoint):  # what the run loads fits what it builds
        if path:
            fitting_checkpoint(net, path, structure_only=True)
    return net


def check_cfg_ids(options: RunOptions, net) -> None:
    """Every option that names cfg_ids names ones the network has (--save-predictions; --val-stitches and a
    top1@ID --eval-metric in training), by the run's own parsers of them."""
    prediction_ids(options.eval.save_predictions, net)
    if not options.job.eval:
        panel_cfg_ids(options.eval, net)


def check_hub_weights(options: RunOptions, stitch_cfg: StitchConfig | None) -> None:
    """Every model the run loads timm's pretrained weights for (an anchor without a checkpoint unless
    --no-pretrained, a plain --model with --pretrained, a distillation teacher without --teacher-checkpoint) has
    them cached here or reachable; else one line naming it, where it looked and the fixes, within seconds
    (`check_pretrained`), not a minute of download retries in every rank."""
    network, loss = options.network, options.loss
    names = []
    if stitch_cfg is None:
        if network.model and network.pretrained:
            names.append(("--model", network.model))
    elif not network.no_pretrained:
        names += [(f"anchor {i}", a.name) for i, a in enumerate(stitch_cfg.anchors) if a.checkpoint is None]
    if loss.distillation_type != "none" and loss.teacher and not loss.teacher_checkpoint and \
            not _teacher_is_anchor(loss, stitch_cfg) and not loss.no_pretrained and not options.job.eval:
        names.append(("teacher", loss.teacher))
    for where, name in names:
        try:
            check_pretrained(name, where)
        except WeightsUnavailable as e:
            if not options.job.dry_run:
                raise
            # a dry run resolves a run for any machine (another may have the weights): said once, not refused
            if not os.environ.get(WARNED_ENV) and world(launched=True)[0] == 0:
                print(f"warning: here the run would be refused: {one_line(e)}", file=sys.stderr, flush=True)
            return


def check_sampling(options: RunOptions, net, cfg: StitchConfig) -> None:
    """What training draws: --freeze-anchors leaves a stitched route to train, and the config's sampler is built as
    the run builds it (its type and options; ROS prices the routes with the cost model on the meta network's
    zero-filled copy), so a bad sampler is refused here and by distributed_train.sh's check, not after logging."""
    train = options.train
    if train.freeze_anchors and len(anchor_routes(net)) == len(net.routes):
        raise UsageError(f"--freeze-anchors leaves nothing to train: the stitch config {cfg.path!r} has "
                         f"{net.n_anchors} anchor(s) and no stitched route; drop --freeze-anchors or add an anchor")
    run_sampler(net, cfg, train.seed, 0, sync=train.sample_sync, freeze_anchors=train.freeze_anchors)


def check_training(options: RunOptions, stitch_cfg: StitchConfig | None = None) -> None:
    """What training builds late (the optimizer, the distillation teacher: a timm name, or a labelled anchor of
    `stitch_cfg`), refused before any work (the rates and the LR schedule are refused where they are resolved,
    `snnet.train.resolve.resolve`)."""
    if options.job.eval:
        return
    optim, loss = options.optim, options.loss
    check_optimizer_name(optim.opt)
    if optim.opt_betas is not None and len(optim.opt_betas) == 1 and _takes_two_betas(optim.opt):
        raise UsageError(f"--opt-betas {optim.opt_betas[0]:g}: --opt {optim.opt} takes two betas (beta1 beta2); give "
                         f"both, e.g. --opt-betas {optim.opt_betas[0]:g} 0.999")
    if loss.distillation_type != "none" and loss.teacher and not _teacher_is_anchor(loss, stitch_cfg):
        check_model_name(loss.teacher)


def _teacher_is_anchor(loss: LossOptions, stitch_cfg: StitchConfig | None) -> bool:
    """--teacher names a labelled anchor of the stitch config: built from its spec and checkpoint, not by a timm
    name and not downloaded."""
    return stitch_cfg is not None and loss.teacher in stitch_cfg.labelled()


def _takes_two_betas(opt: str) -> bool:
    """Whether timm's optimizer `opt` reads `betas` as a pair (a default of two values)."""
    import inspect

    from timm.optim import get_optimizer_class
    try:
        cls = get_optimizer_class(opt.lower().split("_")[-1], bind_defaults=False)
        default = inspect.signature(cls).parameters.get("betas")
    except Exception:  # an optimizer timm builds otherwise: left to timm
        return False
    return default is not None and isinstance(default.default, tuple) and len(default.default) == 2


def main(argv: list[str] | None = None) -> int:
    """``python -m snnet.train.preflight [--print-output-dir] NUM_PROC TRAIN_ARGS...``: the checks for a launch of
    NUM_PROC processes per node; --print-output-dir prints the run's folder once they pass (slurm/train.sbatch locks
    it for the job)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    show = argv[:1] == ["--print-output-dir"]
    argv = argv[1:] if show else argv
    try:
        from snnet.train.args import parse_args  # this command line only: the checks take typed options
        args, stitch_cfg = parse_args(argv[1:])
        # typed and resolved as train.py's main does, at the launch's processes per node
        options = resolve(RunOptions.from_values(vars(args)), world_size=int(argv[0]))
        if not options.job.dry_run:
            check_run(options, stitch_cfg, anchor_checkpoints=True)
        else:  # the dry run checks the rest in its ranks; weights not loadable here are said once, before they start
            check_hub_weights(options, stitch_cfg)
    except SNNetError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    _warn_oversubscribed(options, int(argv[0]))
    if show:
        print(options.out_dir)
    return 0


def _warn_oversubscribed(options: RunOptions, nproc: int) -> None:
    """More training processes on a CPU than the cores this launch may use: not refused (a DDP check on a laptop is
    fine), but they take turns on the cores and every step waits for the slowest, so the launch says so and how
    to keep the global batch with fewer processes."""
    cores = usable_cores()
    if nproc <= cores or device_from_flag(options.train.device, here=False).type != "cpu":
        return
    batch = options.loader.batch_size
    print(f"warning: {nproc} training processes on the {cores} CPU core(s) this launch may use take turns on them, "
          f"and each step waits for the slowest; on a CPU, ./distributed_train.sh {cores} with -b "
          f"{-(-batch * nproc // cores)} trains about the same global batch ({batch * nproc} images) faster",
          file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
