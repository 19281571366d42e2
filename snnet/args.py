"""Command line of train.py: timm train.py's flag names and meanings, plus the SN-Net flags.

Precedence, lowest first: built-in defaults < ``-c`` YAML < ``--stitch_config`` JSON < flags on the command line
(SN-Net let its JSON override the command line; here what the user typed wins).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

from .config import ConfigError, StitchConfig, load_stitch_config


class UsageError(ValueError):
    """Bad command-line input: printed as one line, exit code 2."""


def _number(s: str, kind: type):
    try:
        return kind(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not {'an integer' if kind is int else 'a number'}") from None


def _positive_int(s: str) -> int:
    v = _number(s, int)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} is not >= 1")
    return v


def _non_negative_float(s: str) -> float:
    v = _number(s, float)
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"{s} is not >= 0")
    return v


def _probability(s: str) -> float:
    v = _number(s, float)
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"{s} is not a probability in [0, 1]")
    return v


class _KwargsAction(argparse.Action):
    """k=v pairs with Python-literal values (timm's ParseKwargs, with an error that names the bad pair)."""

    def __call__(self, parser, namespace, values, option_string=None):
        import ast
        out = {}
        for item in values:
            key, sep, raw = item.partition("=")
            if not sep or not key:
                raise UsageError(f"{option_string} {item!r}: write key=value, e.g. depth=6")
            try:
                out[key] = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                out[key] = raw
        setattr(namespace, self.dest, out)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, no usage dump
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="train.py", description="Train and evaluate stitchable neural networks (SN-Net) over timm "
                "models, with timm train.py's flags.", allow_abbrev=False)
    p.add_argument("-c", "--config", default="", metavar="FILE", help="YAML file whose keys set flag defaults")

    g = p.add_argument_group("Dataset")
    g.add_argument("data", nargs="?", metavar="DIR", help="dataset root (ImageFolder: train/ and val/ or validation/)")
    g.add_argument("--data-dir", metavar="DIR", help="dataset root (same as the positional DIR)")
    g.add_argument("--dataset", default="", help="timm dataset kind: '' (folder/tar), torch/<name>, hfds/<name>, ...")
    g.add_argument("--train-split", default="train")
    g.add_argument("--val-split", default="validation", help="falls back to val/ when validation/ is absent")
    g.add_argument("--class-map", default="")
    g.add_argument("--dataset-download", action="store_true")

    g = p.add_argument_group("Model")
    g.add_argument("--stitch_config", "--stitch-config", dest="stitch_config", metavar="FILE",
                   help="stitch config JSON (SN-Net's files accepted as they are)")
    g.add_argument("--model", default=None, help="train/evaluate one plain timm model instead of an SN-Net")
    g.add_argument("--no-pretrained", action="store_true", help="random anchors (no hub weights)")
    g.add_argument("--pretrained", action="store_true", help="(plain --model) start from hub weights")
    g.add_argument("--initial-checkpoint", default="", help="weights to start from (model only)")
    g.add_argument("--resume", default="", help="resume model, optimizer, scaler and epoch from a checkpoint")
    g.add_argument("--no-resume-opt", action="store_true")
    g.add_argument("--auto-resume", action="store_true", help="resume from <output>/<experiment>/last.pth.tar when "
                   "it exists (always on when torchrun --max-restarts restarts the workers); needs --experiment")
    g.add_argument("--model-kwargs", nargs="*", default={}, action=_KwargsAction, metavar="K=V",
                   help="extra timm.create_model arguments for the model / every anchor, e.g. depth=6")
    g.add_argument("--num-classes", type=_positive_int, default=None)
    g.add_argument("--img-size", type=_positive_int, default=None)
    g.add_argument("--in-chans", type=_positive_int, default=None)
    g.add_argument("--crop-pct", type=float, default=None)
    g.add_argument("--mean", type=float, nargs="+", default=None)
    g.add_argument("--std", type=float, nargs="+", default=None)
    g.add_argument("--interpolation", default="")
    g.add_argument("--drop", type=_probability, default=None)
    g.add_argument("--drop-path", type=_probability, default=None)
    g.add_argument("-b", "--batch-size", type=_positive_int, default=128)
    g.add_argument("-vb", "--validation-batch-size", type=_positive_int, default=None)
    g.add_argument("--channels-last", action="store_true")

    g = p.add_argument_group("Stitching")
    g.add_argument("--eval", action="store_true", help="evaluate every stitch and exit (with --resume: that "
                   "checkpoint; without: the freshly built, least-squares initialised SN-Net)")
    g.add_argument("--ls-mode", choices=("joint", "average"), default=None,
                   help="least-squares init of shared layers (default joint; SN-Net: average)")
    g.add_argument("--stitch-init-bs", type=_positive_int, default=None, help="images for the LS init")
    g.add_argument("--no-ls-init", action="store_true", help="keep the stitching layers' default init")
    g.add_argument("--anchor-lr-scale", type=_non_negative_float, default=None,
                   help="LR multiplier of the anchors (SN-Net: 0.1 for Swin and CNNs, 1 for DeiT/LeViT)")
    g.add_argument("--sample-sync", action="store_true",
                   help="all processes train the same stitch each step (SN-Net: each draws its own)")
    g.add_argument("--val-stitches", type=int, nargs="*", default=None,
                   help="cfg_ids validated after every epoch (default: anchors and a few stitches)")
    g.add_argument("--teacher", default="", metavar="NAME", help="distillation teacher (timm name)")
    g.add_argument("--teacher-checkpoint", default="", help="local weights of the teacher")
    g.add_argument("--distillation-type", choices=("none", "soft", "hard"), default="none")
    g.add_argument("--distillation-alpha", type=_probability, default=0.5)
    g.add_argument("--distillation-tau", type=float, default=1.0)

    g = p.add_argument_group("Optimizer")
    g.add_argument("--opt", default="sgd")
    g.add_argument("--opt-eps", type=float, default=None)
    g.add_argument("--opt-betas", type=float, nargs="+", default=None)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=_non_negative_float, default=2e-5)
    g.add_argument("--clip-grad", type=_non_negative_float, default=None)
    g.add_argument("--clip-mode", choices=("norm", "value", "agc"), default="norm")

    g = p.add_argument_group("Learning rate schedule")
    g.add_argument("--sched", default="cosine")
    g.add_argument("--sched-on-updates", action="store_true")
    g.add_argument("--lr", type=_non_negative_float, default=None, help="absolute learning rate")
    g.add_argument("--lr-base", type=_non_negative_float, default=0.1, help="LR at --lr-base-size global batch")
    g.add_argument("--lr-base-size", type=_positive_int, default=256)
    g.add_argument("--lr-base-scale", choices=("", "linear", "sqrt"), default="")
    g.add_argument("--warmup-lr", type=_non_negative_float, default=1e-5)
    g.add_argument("--min-lr", type=_non_negative_float, default=0.0)
    g.add_argument("--epochs", type=_positive_int, default=300)
    g.add_argument("--start-epoch", type=int, default=None)
    g.add_argument("--decay-epochs", type=float, default=90)
    g.add_argument("--decay-milestones", type=int, nargs="+", default=[90, 180, 270])
    g.add_argument("--decay-rate", "--dr", type=float, default=0.1)
    g.add_argument("--warmup-epochs", type=int, default=5)
    g.add_argument("--warmup-prefix", action="store_true")
    g.add_argument("--cooldown-epochs", type=int, default=0)
    g.add_argument("--patience-epochs", type=int, default=10)

    g = p.add_argument_group("Augmentation and regularization")
    g.add_argument("--no-aug", action="store_true")
    g.add_argument("--scale", type=float, nargs=2, default=[0.08, 1.0])
    g.add_argument("--ratio", type=float, nargs=2, default=[3.0 / 4.0, 4.0 / 3.0])
    g.add_argument("--hflip", type=_probability, default=0.5)
    g.add_argument("--vflip", type=_probability, default=0.0)
    g.add_argument("--color-jitter", type=float, default=0.4)
    g.add_argument("--aa", default=None, help="auto-augment policy, e.g. rand-m9-mstd0.5-inc1")
    g.add_argument("--aug-repeats", type=float, default=0)
    g.add_argument("--aug-splits", type=int, default=0)
    g.add_argument("--reprob", type=_probability, default=0.0)
    g.add_argument("--remode", choices=("const", "rand", "pixel"), default="pixel")
    g.add_argument("--recount", type=_positive_int, default=1)
    g.add_argument("--resplit", action="store_true")
    g.add_argument("--mixup", type=_non_negative_float, default=0.0)
    g.add_argument("--cutmix", type=_non_negative_float, default=0.0)
    g.add_argument("--cutmix-minmax", type=float, nargs=2, default=None)
    g.add_argument("--mixup-prob", type=_probability, default=1.0)
    g.add_argument("--mixup-switch-prob", type=_probability, default=0.5)
    g.add_argument("--mixup-mode", choices=("batch", "pair", "elem"), default="batch")
    g.add_argument("--mixup-off-epoch", type=int, default=0)
    g.add_argument("--smoothing", type=_probability, default=0.1)
    g.add_argument("--train-interpolation", default="random")

    g = p.add_argument_group("Batch norm")
    g.add_argument("--sync-bn", action="store_true")
    g.add_argument("--dist-bn", choices=("", "reduce", "broadcast"), default="reduce")
    g.add_argument("--split-bn", action="store_true")

    g = p.add_argument_group("Device, precision, distributed")
    g.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    g.add_argument("--amp", action="store_true", help="mixed precision via torch.amp (fp16 + GradScaler on CUDA, "
                   "bf16 on CPU); NVIDIA apex is not used")
    g.add_argument("--amp-dtype", choices=("", "float16", "bfloat16"), default="")
    g.add_argument("-j", "--workers", type=int, default=4)
    g.add_argument("--pin-mem", action="store_true")
    g.add_argument("--no-prefetcher", action="store_true")
    g.add_argument("--dist-backend", default=None, help="default: nccl on CUDA, gloo on CPU")
    g.add_argument("--dist-url", default=None)

    g = p.add_argument_group("Output and logging")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--output", default="", help="root of the run folders (default ./output/train)")
    g.add_argument("--experiment", default="", help="run folder name (default: <date>-<model>-<img size>)")
    g.add_argument("--log-interval", type=_positive_int, default=50)
    g.add_argument("--checkpoint-hist", type=_positive_int, default=10)
    g.add_argument("--eval-metric", default="top1")
    g.add_argument("--val-interval", type=_positive_int, default=1)
    return p


#: stitch-config JSON field -> argparse dest (SN-Net's field names on the left)
JSON_TO_ARG = {
    "batch_size": "batch_size", "data_path": "data", "data_set": "dataset", "exp_name": "experiment",
    "input_size": "img_size", "num_workers": "workers", "lr": "lr_base", "warmup_lr": "warmup_lr",
    "min_lr": "min_lr", "epochs": "epochs", "distillation_type": "distillation_type", "teacher_model": "teacher",
    "num_classes": "num_classes", "drop_path": "drop_path", "anchor_lr_scale": "anchor_lr_scale",
    "weight_decay": "weight_decay", "opt": "opt", "sched": "sched", "warmup_epochs": "warmup_epochs",
    "clip_grad": "clip_grad", "clip_mode": "clip_mode", "smoothing": "smoothing", "mixup": "mixup",
    "cutmix": "cutmix", "aa": "aa", "reprob": "reprob", "sched_on_updates": "sched_on_updates",
    "distillation_alpha": "distillation_alpha", "ls_mode": "ls_mode", "stitch_init_bs": "stitch_init_bs",
}


def _explicit_dests(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """Dests the user typed on the command line (parse again with every default suppressed)."""
    quiet = _Parser(add_help=False, allow_abbrev=False, argument_default=argparse.SUPPRESS)
    for action in parser._actions:
        if action.option_strings and not isinstance(action, argparse._HelpAction):
            kwargs = {"dest": action.dest, "default": argparse.SUPPRESS}
            if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
                kwargs["action"] = "store_true"
            elif isinstance(action, _KwargsAction):
                kwargs.update(nargs=action.nargs, action=_KwargsAction)
            else:
                kwargs.update(nargs=action.nargs, type=action.type, choices=action.choices)
            quiet.add_argument(*action.option_strings, **kwargs)
        elif not action.option_strings:
            quiet.add_argument(action.dest, nargs="?", default=argparse.SUPPRESS)
    return set(vars(quiet.parse_args(argv)))


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, StitchConfig | None]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    config_parser = _Parser(add_help=False, allow_abbrev=False)
    config_parser.add_argument("-c", "--config", default="")
    known, _ = config_parser.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**_load_yaml(known.config, parser))
    args = parser.parse_args(argv)
    explicit = _explicit_dests(parser, argv)

    stitch_cfg = None
    if args.stitch_config:
        stitch_cfg = load_stitch_config(args.stitch_config)
        for field, value in stitch_cfg.values.items():
            dest = JSON_TO_ARG.get(field)
            if dest is None or dest in explicit:
                continue
            if dest == "lr_base":  # SN-Net's lr is per 512 images of global batch (spec 2.4, 3.4)
                if "lr" in explicit or "lr_base" in explicit:
                    continue
                args.lr_base_size, args.lr_base_scale = 512, "linear"
            if dest == "dataset":
                value = "" if value.upper() == "IMNET" else value
            if dest == "data" and (args.data or args.data_dir):
                continue
            setattr(args, dest, value)
    elif args.model is None:
        raise UsageError("give --stitch_config FILE (an SN-Net) or --model NAME (one plain timm model)")
    if args.stitch_config and args.model:
        raise UsageError(f"--model {args.model!r} and --stitch_config are exclusive: the config names the anchors")
    args.data_dir = args.data_dir or args.data
    if not args.data_dir:
        raise UsageError("no dataset: give the dataset folder as the first argument (e.g. train.py /data/imagenet)")
    _check_values(args)
    return args, stitch_cfg


def _check_values(args: argparse.Namespace) -> None:
    if args.workers < 0:
        raise UsageError(f"-j/--workers {args.workers} must be >= 0")
    if args.split_bn and not (args.aug_splits > 1 or args.resplit):
        raise UsageError("--split-bn needs --aug-splits > 1 or --resplit (timm's rule); add --resplit")
    if args.val_stitches is not None and any(c < 0 for c in args.val_stitches):
        raise UsageError(f"--val-stitches {args.val_stitches} must be cfg_ids >= 0")
    restarted = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"
    if (args.auto_resume or restarted) and not args.experiment and not args.eval:
        raise UsageError("--auto-resume (and torchrun --max-restarts) needs --experiment NAME, so that a restarted "
                         "run finds its own checkpoint")
    if args.distillation_type != "none" and not args.teacher:
        raise UsageError(f"--distillation-type {args.distillation_type} needs --teacher NAME")


def _load_yaml(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    import yaml
    if not os.path.isfile(path):
        raise UsageError(f"-c/--config {path!r} does not exist; give an existing YAML file")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"-c/--config {path!r} is not valid YAML ({str(e).splitlines()[0]}); fix the file") from None
    if not isinstance(data, dict):
        raise UsageError(f"-c/--config {path!r} must hold a mapping of flag names to values")
    dests = {a.dest for a in parser._actions}
    out = {}
    for k, v in data.items():
        dest = str(k).replace("-", "_")
        if dest not in dests:
            raise UsageError(f"-c/--config {path!r}: unknown key {k!r}; keys are train.py flag names")
        out[dest] = v
    return out


__all__ = ["build_parser", "parse_args", "UsageError", "ConfigError", "JSON_TO_ARG"]
