"""Every input of a run checked before any work: arguments and configs (parsed), the output folder, the checkpoints,
the data layout, the augmentation. A bad input is one line and exit 2 before a weight is loaded or an image read.

train.py runs these checks first, identically on every rank; distributed_train.sh runs them once before torchrun
starts its processes (``python -m snnet.train.preflight NUM_PROC ARGS``), so a bad input under torchrun is one line from
one process, not one per rank followed by torchrun's traceback.

This module is part of train.py's argument resolution: `check_run` and `check_recipe` check the resolved arguments
as a whole (train.py's namespace: every flag of the recipe, called only by train.py and by its own entry point
above). The checks other tools reuse take typed values: `check_output` a folder, `check_augmentation` the
`LoaderOptions` and an input size.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from timm.data import create_transform

from snnet.core.build import anchor_weights, check_model_name, create_anchor
from snnet.core.checkpoint import CheckpointError, check_same_network, fit_report, json_field, load_checkpoint
from snnet.core.config import AnchorSpec, StitchConfig
from snnet.core.distributed import world
from snnet.core.errors import SNNetError, UsageError, one_line
from snnet.core.fileio import lock_holder
from snnet.core.steps import UnitStep
from snnet.data.checks import check_data
from snnet.data.options import DataOptions, LoaderOptions
from snnet.data.transforms import timm_crop_mode
from snnet.train.args import options_from, parse_args
from snnet.train.device import device_from_flag
from snnet.train.network import build_network, check_train_exclude
from snnet.train.optim import check_optimizer_name, resolve_lrs
from snnet.train.options import OptimOptions, ScheduleOptions
from snnet.train.resolve import describe_network, eval_data_config, network_options, schedule


class OutputError(SNNetError):
    """An output folder that cannot be written; the message names it and the fix."""


def output_dir(args: argparse.Namespace) -> Path:
    """Where the run writes: <output>/<experiment>; an evaluation of --resume CKPT without --output/--experiment
    writes next to the checkpoint (a rerun continues there)."""
    if args.eval and args.resume and not (args.output or args.experiment):
        return Path(args.resume).resolve().parent
    name = args.experiment
    if not name:
        stem = Path(args.stitch_config).stem if args.stitch_config else args.model
        name = f"eval-{stem}" if args.eval else f"{time.strftime('%Y%m%d-%H%M%S')}-{stem}-{args.img_size or 224}"
    return Path(args.output or "./output/train") / name


def check_output(path: Path) -> None:
    """`path` exists as a writable folder, or can be created: its nearest existing ancestor is a writable folder.
    Nothing is left behind (a refused run leaves no trace): a folder below one this user cannot enter counts as
    missing (os.path.exists: pathlib raised PermissionError there), and the ancestor is tried by making and removing
    a temporary folder in it, which also refuses what permission bits cannot tell (/proc, a read-only mount, root's
    writes where the kernel allows none)."""
    probe = path
    while not os.path.exists(probe):
        if probe.parent == probe:
            break
        probe = probe.parent
    if os.path.exists(probe) and not os.path.isdir(probe):
        raise OutputError(f"output folder {str(path)!r} cannot be made: {str(probe)!r} is a file; pass another "
                          f"--output/--experiment")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {str(path)!r} is not writable ({str(probe)!r} does not allow it); pass "
                          f"another --output or fix the permissions")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".snnet-probe-", dir=probe))
    except OSError as e:
        raise OutputError(f"output folder {str(path)!r} cannot be written: making a folder in {str(probe)!r} fails "
                          f"({e.strerror or type(e).__name__}); pass another --output") from None
    # said here too: distributed_train.sh's check runs before torchrun starts. Only rank 0 (or that one-process
    # check) asks: rank 0 takes the lock (train.main.run), and another rank of the same launch checking after it
    # would see its own run's lock as another run's (a race that refused rank 1 and hung torchrun restarts)
    holder = lock_holder(path) if world(launched=True)[0] == 0 else None
    if holder is not None:
        raise OutputError(f"folder {str(path)!r} is in use by another run ({holder}); wait for it to end or pass "
                          f"another --output/--experiment")


def check_checkpoints(args: argparse.Namespace, stitch_cfg: StitchConfig | None = None) -> None:
    """--resume and --initial-checkpoint are readable pickle-free checkpoints (their fit to the network is checked
    once the network is built, before any image is read); a --resume checkpoint that recorded its stitch config was
    made with the network the given config builds (a field such as skip_final_norm changes the network without
    changing a weight's shape, so the state dict alone would load and run another network)."""
    for path in (args.resume, args.initial_checkpoint):
        if not path:
            continue
        state = load_checkpoint(path)
        _check_classes(args, path, state)
        if path == args.resume and not args.eval:
            _check_epochs_left(args, state)
        if path != args.resume or stitch_cfg is None:
            continue
        check_same_network(stitch_cfg, state, path, args.stitch_config, "pass the config it was trained with")
    if args.teacher_checkpoint and args.distillation_type != "none" and not args.eval:
        _check_teacher_checkpoint(args)


def _check_classes(args: argparse.Namespace, path: str, state: dict) -> None:
    """--num-classes against the classes a checkpoint was trained for (its recorded arguments), named by its
    classifier's shape: said first (before the epochs it finished, say), as the network could not load it."""
    recorded = (json_field(state, "args") or {}).get("num_classes")
    if not args.num_classes or not isinstance(recorded, int) or recorded == args.num_classes:
        return
    heads = [f"{k} {tuple(v.shape)}" for k, v in state.get("state_dict", {}).items()
             if getattr(v, "ndim", 0) >= 1 and v.shape[0] == recorded and k.rsplit(".", 1)[-1] == "weight"
             and any(p in k for p in ("head", "classifier", "fc."))][:2]
    raise CheckpointError(f"checkpoint {path!r} has a classifier for {recorded} classes "
                          f"({', '.join(heads) or 'its head'}), not the --num-classes {args.num_classes} given; "
                          f"pass --num-classes {recorded}, or drop --num-classes")


def _check_teacher_checkpoint(args: argparse.Namespace) -> None:
    """--teacher-checkpoint: a readable pickle-free checkpoint whose keys and shapes fit the teacher (compared with
    the teacher's meta-device structure: no weight is allocated; the classifier only where --num-classes is given,
    as the data decides its size otherwise)."""
    state = load_checkpoint(args.teacher_checkpoint, "--teacher-checkpoint")["state_dict"]
    teacher = create_anchor(AnchorSpec(args.teacher), pretrained=False, structure_only=True,
                            num_classes=args.num_classes)
    own = teacher.state_dict()
    if args.num_classes is None:  # the head's size is the data's: compare the rest
        head = teacher.get_classifier()
        names = {f"{n}.{k}" for n, m in teacher.named_modules() if m is head for k in m.state_dict()}
        own, state = ({k: v for k, v in d.items() if k not in names} for d in (own, state))
    report = fit_report(own, state)
    if report:
        raise CheckpointError(f"--teacher-checkpoint {args.teacher_checkpoint!r} does not fit the teacher "
                              f"{args.teacher!r} ({report}); pass the teacher's own checkpoint or its --teacher NAME")


def _check_epochs_left(args: argparse.Namespace, state: dict) -> None:
    """A finished run resumed into another folder would train no epoch and then look there for the last.pth.tar it
    never wrote. (In its own folder, a finished run goes on to its final evaluation: a restart after the last epoch.)"""
    start = args.start_epoch if args.start_epoch is not None else \
        int(state.get("epoch", -1)) + (0 if "batch_idx" in state else 1)
    if start < args.epochs or Path(args.resume).resolve().parent == output_dir(args).resolve():
        return
    raise UsageError(f"--resume {args.resume!r} finished epoch {start} of --epochs {args.epochs}: no epoch is left to "
                     f"train into {str(output_dir(args))!r}; raise --epochs, or evaluate it with --eval --resume")


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


def check_run(args: argparse.Namespace, stitch_cfg: StitchConfig | None, world_size: int,
              anchor_checkpoints: bool = False) -> None:
    """Every input of the run. `anchor_checkpoints`: the anchors' checkpoints read and fitted too (the launcher's
    check, before torchrun starts: train.py itself loads them moments later, with the same message)."""
    device_from_flag(args.device)  # a name that is no torch device, or CUDA where there is none
    check_output(output_dir(args))
    check_checkpoints(args, stitch_cfg)
    check_data(options_from(DataOptions, args), need_train=not args.eval, world_size=world_size)
    check_recipe(args, stitch_cfg, world_size, anchor_checkpoints)


def check_recipe(args: argparse.Namespace, stitch_cfg: StitchConfig | None, world_size: int,
                 anchor_checkpoints: bool = False) -> None:
    """The checks that need no data folder, device or file of this machine (augmentation, optimizer, schedule,
    teacher): `--dry-run`, which resolves a run for another machine, runs these too."""
    if not args.eval:
        check_augmentation(options_from(LoaderOptions, args), eval_data_config(args, stitch_cfg)["input_size"])
    check_training(args, world_size)
    check_structure(args, stitch_cfg, anchor_checkpoints)


def check_structure(args: argparse.Namespace, stitch_cfg: StitchConfig | None, anchor_checkpoints: bool = False
                    ) -> None:
    """The network built as the run builds it, on the meta device (no weight read, downloaded or allocated): model
    arguments timm refuses, anchors that cannot be stitched at this input size, a positions selection asking for
    more positions than a pair has, routes `train_exclude` names that the network lacks, and anchor checkpoints that
    are missing or do not fit their anchors (`anchor_checkpoints`) (a wrong embed_dim, a config without the
    input_size they were trained at; the classifier too when the number of classes is given)."""
    known = args.num_classes or (stitch_cfg.get("num_classes") if stitch_cfg is not None else None)
    net, cfg = build_network(network_options(args, num_classes=known or 1000), stitch_cfg, structure_only=True)
    if net is not None:
        check_train_exclude(net, cfg)
    if net is not None and cfg is not None and not args.eval:
        check_sampling(args, net, cfg)
    if anchor_checkpoints and net is not None and cfg is not None:  # what each rank loads first fits its anchor
        for i, spec in enumerate(cfg.anchors):
            if spec.checkpoint is not None:
                anchor_weights(net.anchor(i), spec, check_only=True, skip_head=known is None)


def check_sampling(args: argparse.Namespace, net, cfg: StitchConfig) -> None:
    """What training draws: --freeze-anchors leaves a stitched route to train, and the config's sampler is built as
    the run builds it (its type and options; ROS prices the routes with the cost model on the meta network's
    zero-filled copy), so a bad sampler is refused here and by distributed_train.sh's check, not after logging."""
    if getattr(args, "freeze_anchors", False) and all(isinstance(s, UnitStep) for r in net.routes for s in r):
        raise UsageError(f"--freeze-anchors leaves nothing to train: the stitch config {cfg.path!r} has "
                         f"{net.n_anchors} anchor(s) and no stitched route; drop --freeze-anchors or add an anchor")
    describe_network(args, cfg, net)  # the sampler, as `resolve.describe_network` and the run create it


def check_training(args: argparse.Namespace, world_size: int = 1) -> None:
    """What training builds late (the optimizer, the LR schedule, the distillation teacher), refused before any work."""
    if args.eval:
        return
    check_optimizer_name(args.opt)
    if args.opt_betas is not None and len(args.opt_betas) == 1 and _takes_two_betas(args.opt):
        raise UsageError(f"--opt-betas {args.opt_betas[0]:g}: --opt {args.opt} takes two betas (beta1 beta2); give "
                         f"both, e.g. --opt-betas {args.opt_betas[0]:g} 0.999")
    global_batch = args.batch_size * world_size * max(1, getattr(args, "grad_accum_steps", 1) or 1)
    lr, warmup_lr, min_lr = resolve_lrs(options_from(OptimOptions, args), options_from(ScheduleOptions, args),
                                        global_batch)  # at the launch's world size, as the run resolves it
    if min_lr > lr:
        raise UsageError(f"--min-lr {min_lr:g} is above the LR {lr:g}: the decaying schedule would raise the LR; "
                         f"lower --min-lr or raise --lr")
    schedule(args, warmup_lr, min_lr)  # the scheduler timm builds from the flags, on a one-parameter optimizer
    if args.distillation_type != "none" and args.teacher:
        check_model_name(args.teacher)


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
        args, stitch_cfg = parse_args(argv[1:])
        if not args.dry_run:
            check_run(args, stitch_cfg, int(argv[0]), anchor_checkpoints=True)
    except SNNetError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    if show:
        print(output_dir(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
