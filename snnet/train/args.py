"""Command line of train.py: timm train.py's flag names and meanings, plus the SN-Net flags.

Precedence, lowest first: built-in defaults < ``-c`` YAML < ``--stitch_config`` JSON < flags on the command line
(SN-Net let its JSON override the command line; here what the user typed wins). One mechanism, timm's two-stage
parse: a pre-parser finds the two files, their values become ``parser.set_defaults`` (YAML first, then the stitch
config over it), and the command line is parsed last. File values pass the same type and choice checks as typed ones.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import fields
from typing import Any, TypeVar

from snnet.core import slurm
from snnet.core.config import ARG_DESTS, ConfigError, StitchConfig, load_stitch_config
from snnet.core.errors import UsageError

T = TypeVar("T")


def _number(s: str, kind: type):
    try:
        v = kind(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(v):  # float() takes 'nan' and 'inf', which no flag means
        raise argparse.ArgumentTypeError(f"{s!r} is not a finite number")
    return v


def _int(s: str) -> int:
    return _number(s, int)


def _stitch_id(s: str) -> int | str:
    return s if s == "all" else _number(s, int)


def _float(s: str) -> float:
    return _number(s, float)


def _positive_int(s: str) -> int:
    v = _number(s, int)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} is not >= 1")
    return v


def _non_negative_int(s: str) -> int:
    v = _number(s, int)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{v} is not >= 0")
    return v


def _non_negative_float(s: str) -> float:
    v = _number(s, float)
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"{s} is not >= 0")
    return v


def _positive_float(s: str) -> float:
    v = _number(s, float)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{s} is not > 0")
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
        # the flag given twice on one command line adds up (the later value of a key wins); a -c YAML or stitch
        # config default is replaced, as every typed flag replaces its default
        repeated = getattr(self, "_parsing", None) is namespace
        self._parsing = namespace
        out = dict(getattr(namespace, self.dest) or {}) if repeated else {}
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


class _HelpFormatter(argparse.HelpFormatter):
    """Every help line ends with the flag's default, as with timm's '(default: ...)'. None and False mean 'not set';
    for those the help text says what happens instead. Run with -c/--stitch_config, --help shows their values."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return text
        return text + " (default: %(default)r)"


def _add_config_flags(container: Any) -> None:
    """-c and --stitch_config: in the pre-parser, which reads them first, and in the full parser, for --help."""
    container.add_argument("-c", "--config", default="", metavar="FILE",
                           help="YAML config file specifying default arguments: keys are flag names (- or _), "
                                "values as typed; the stitch config and typed flags override it")
    container.add_argument("--stitch_config", "--stitch-config", dest="stitch_config", metavar="FILE",
                           help="stitch config JSON (SN-Net's files accepted as they are); its fields such as lr, "
                                "epochs, input_size set flag defaults over -c; typed flags override it")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="train.py", description="Train and evaluate stitchable neural networks (SN-Net) over timm "
                "models, with timm train.py's flags. Precedence: defaults < -c YAML < --stitch_config < typed flags.",
                allow_abbrev=False, formatter_class=_HelpFormatter)
    _add_config_flags(p.add_argument_group("Configuration files"))

    g = p.add_argument_group("Dataset")
    g.add_argument("data", nargs="?", metavar="DIR", help="path to dataset (ImageFolder: train/ and val/ or "
                   "validation/); a stitch config's data_path is its default")
    g.add_argument("--data-dir", metavar="DIR", help="path to dataset (root dir); wins over the positional DIR")
    g.add_argument("--dataset", default="", help="dataset type + name ('<type>/<name>', e.g. torch/cifar10); '' is "
                   "ImageFolder or ImageTar (SN-Net's data_set IMNET)")
    g.add_argument("--train-split", default="train", help="dataset train split")
    g.add_argument("--val-split", default="validation", help="dataset validation split; falls back to val/ when "
                   "validation/ is absent")
    g.add_argument("--class-map", default="", help="path to class to idx mapping file")
    g.add_argument("--dataset-download", action="store_true",
                   help="Allow download of dataset for torch/ and tfds/ datasets that support it.")

    g = p.add_argument_group("Model")
    g.add_argument("--model", default=None, help="Name of model to train: one plain timm model instead of an SN-Net "
                   "(exclusive with --stitch_config)")
    g.add_argument("--no-pretrained", action="store_true", help="random anchors (no hub weights)")
    g.add_argument("--pretrained", action="store_true",
                   help="Start with pretrained version of specified network (if avail); plain --model only")
    g.add_argument("--initial-checkpoint", default="", help="Initialize model from this checkpoint (weights only)")
    g.add_argument("--resume", default="", help="Resume full model and optimizer state from checkpoint (model, "
                   "optimizer, scaler and epoch)")
    g.add_argument("--no-resume-opt", action="store_true", help="prevent resume of optimizer state when resuming "
                   "model")
    g.add_argument("--auto-resume", action="store_true", help="resume from <output>/<experiment>/last.pth.tar when "
                   "it exists (always on when torchrun --max-restarts restarts the workers); needs --experiment")
    g.add_argument("--model-kwargs", nargs="*", default={}, action=_KwargsAction, metavar="K=V",
                   help="extra timm.create_model arguments for the model / every anchor, e.g. depth=6")
    g.add_argument("--num-classes", type=_positive_int, default=None, help="number of label classes (default: the "
                   "dataset's class folders, else the stitch config's num_classes)")
    g.add_argument("--img-size", type=_positive_int, default=None, help="Image size (default: the model's)")
    g.add_argument("--in-chans", type=_positive_int, default=None, help="Image input channels (default: the "
                   "model's)")
    g.add_argument("--crop-pct", type=_float, default=None, help="Input image center crop percent (for validation "
                   "only; default: the model's)")
    g.add_argument("--mean", type=_float, nargs="+", default=None, help="Override mean pixel value of dataset "
                   "(default: the model's)")
    g.add_argument("--std", type=_float, nargs="+", default=None, help="Override std deviation of dataset "
                   "(default: the model's)")
    g.add_argument("--interpolation", default="", help="Image resize interpolation type (overrides model; '' keeps "
                   "the model's)")
    g.add_argument("--drop", type=_probability, default=None, help="Dropout rate (default: the model's)")
    g.add_argument("--drop-path", type=_probability, default=None, help="Drop path rate (default: the model's)")
    g.add_argument("-b", "--batch-size", type=_positive_int, default=128,
                   help="Input batch size for training, per process")
    g.add_argument("-vb", "--validation-batch-size", type=_positive_int, default=None,
                   help="Validation batch size override (default: --batch-size)")
    g.add_argument("--channels-last", action="store_true", help="Use channels_last memory layout")
    g.add_argument("--grad-accum-steps", type=_positive_int, default=1, metavar="N",
                   help="batches per optimizer step: the loss is divided by N, all N train the step's stitch, DDP "
                        "syncs gradients on the last; steps per epoch = batches // N (the remainder batches of each "
                        "epoch are dropped); the LR rule's global batch is -b x processes x N")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each block's activations in the backward pass (torch.utils.checkpoint, "
                        "non-reentrant) to save memory, while training only (default: off)")
    g.add_argument("--torchcompile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile each anchor block module in place with BACKEND (bare flag: inductor) for "
                        "training and its final evaluation; the route changes every step, so the whole network is "
                        "not compiled, and stems, norms, heads and stitching layers stay eager (default: off)")

    g = p.add_argument_group("Stitching")
    g.add_argument("--dry-run", action="store_true",
                   help="resolve the whole run (config layers, world size of the launch, LR per parameter group, "
                        "epochs, eval transform, teacher), print it as YAML (the args.yaml every run writes) and "
                        "exit without loading weights or reading images")
    g.add_argument("--snnet-compat", action="store_true",
                   help="reproduce SN-Net's accidents too: the anchors' no-weight-decay parameters (cls_token, "
                        "pos_embed, relative-position tables, attention biases) are decayed, and the LS init is "
                        "--ls-mode snnet unless --ls-mode is given (docs/snnet_compat.md, C35)")
    g.add_argument("--eval", action="store_true", help="evaluate every stitch and exit (with --resume: that "
                   "checkpoint; without: the freshly built, least-squares initialised SN-Net)")
    g.add_argument("--ls-mode", choices=("joint", "average", "snnet"), default=None, help="least-squares init: "
                   "joint (shared layers fitted to all their positions, eval mode, clean images), average (SN-Net's "
                   "mean of per-position solutions, otherwise as joint) or snnet (SN-Net's init exactly: the first "
                   "augmented, mixed-up training batch of stitch_init_bs images per process, train mode, float32 "
                   "pinv per position, averaged; rank 0's result kept) (default: the stitch config's ls_mode, joint)")
    g.add_argument("--stitch-init-bs", type=_positive_int, default=None, help="images for the least-squares init "
                   "(default: the stitch config's stitch_init_bs, 100)")
    g.add_argument("--no-ls-init", action="store_true", help="keep the stitching layers' default init")
    g.add_argument("--anchor-lr-scale", type=_non_negative_float, default=None,
                   help="LR multiplier of the anchors (default 1; SN-Net: 0.1 for Swin and CNNs, 1 for DeiT/LeViT)")
    g.add_argument("--freeze-anchors", action="store_true",
                   help="train only the stitching layers: anchors frozen and in eval mode (no BatchNorm or dropout "
                        "updates, no optimizer state for them), SN-Netv2's cheap path")
    g.add_argument("--sample-sync", action="store_true",
                   help="all processes train the same stitch each step (SN-Net: each draws its own)")
    g.add_argument("--val-stitches", type=_stitch_id, nargs="*", default=None,
                   help="cfg_ids validated after every epoch, or 'all' (every stitch, one pass; summary.csv then "
                        "also gets the front's hypervolume, front_hv) (default: anchors and a few stitches)")
    g.add_argument("--save-predictions", default="anchors", metavar="WHICH",
                   help="with the final evaluation of every stitch, save per-image predictions (top-5 classes, top "
                        "softmax probability, correct) of these stitches next to stitches_res.txt as "
                        "stitches_pred.npz, for `snnet pareto --baselines`: anchors (default), all, none, or "
                        "comma-separated cfg_ids (anchors,9,12 works too)")
    g.add_argument("--teacher", default="", metavar="NAME", help="distillation teacher (timm name)")
    g.add_argument("--teacher-checkpoint", default="", help="local weights of the teacher ('' = hub weights)")
    g.add_argument("--distillation-type", choices=("none", "soft", "hard"), default="none",
                   help="DeiT distillation from --teacher: none, soft (KL divergence) or hard (teacher's labels)")
    g.add_argument("--distillation-alpha", type=_probability, default=0.5, help="weight of the distillation loss")
    g.add_argument("--distillation-tau", type=_float, default=1.0, help="temperature of soft distillation")

    g = p.add_argument_group("Optimizer")
    g.add_argument("--opt", default="sgd", help="Optimizer (a timm.optim name)")
    g.add_argument("--opt-eps", type=_float, default=None, help="Optimizer Epsilon (default: the optimizer's)")
    g.add_argument("--opt-betas", type=_float, nargs="+", default=None, help="Optimizer Betas (default: the "
                   "optimizer's)")
    g.add_argument("--momentum", type=_float, default=0.9, help="Optimizer momentum")
    g.add_argument("--weight-decay", type=_non_negative_float, default=2e-5, help="weight decay")
    g.add_argument("--clip-grad", type=_non_negative_float, default=None, help="Clip gradient norm (default: no "
                   "clipping)")
    g.add_argument("--clip-mode", choices=("norm", "value", "agc"), default="norm", help="Gradient clipping mode")
    g.add_argument("--layer-decay", type=_positive_float, default=None, metavar="RATE",
                   help="layer-wise LR decay: an anchor parameter's LR x RATE ** (depth - layer), layer 0 the stem, "
                        "1..n the blocks, n+1 = depth the norm and head, times --anchor-lr-scale; stitching layers "
                        "keep x1 (default: off)")

    g = p.add_argument_group("Learning rate schedule")
    g.add_argument("--sched", default="cosine", help="LR scheduler")
    g.add_argument("--sched-on-updates", action="store_true",
                   help="Apply LR scheduler step on update instead of epoch end.")
    g.add_argument("--lr", type=_non_negative_float, default=None,
                   help="learning rate, absolute; overrides --lr-base if set (default: from --lr-base)")
    g.add_argument("--lr-base", type=_non_negative_float, default=0.1,
                   help="base learning rate: lr = lr_base * global_batch_size / lr_base_size. A stitch config's lr "
                        "(SN-Net's LR per 512 images) becomes this default with --lr-base-size 512 and "
                        "--lr-base-scale linear, so with such a config a typed --lr-base is per 512 images too, "
                        "unless --lr-base-size is typed")
    g.add_argument("--lr-base-size", type=_positive_int, default=256,
                   help="base learning rate batch size (divisor; 512 when the stitch config holds lr)")
    g.add_argument("--lr-base-scale", choices=("", "linear", "sqrt"), default="",
                   help="base learning rate vs batch_size scaling ('linear', 'sqrt', based on opt if empty)")
    g.add_argument("--warmup-lr", type=_non_negative_float, default=1e-5, help="warmup learning rate")
    g.add_argument("--min-lr", type=_non_negative_float, default=0.0,
                   help="lower lr bound for cyclic schedulers that hit 0")
    g.add_argument("--scale-warmup-min-lr", action="store_true",
                   help="scale --warmup-lr and --min-lr with the global batch like an LR from --lr-base (SN-Net's "
                        "Swin recipe scaled all three; DeiT and LeViT scaled only the LR)")
    g.add_argument("--epochs", type=_positive_int, default=300, help="number of epochs to train")
    g.add_argument("--start-epoch", type=_int, default=None,
                   help="manual epoch number (useful on restarts; default: the resumed checkpoint's, else 0)")
    g.add_argument("--decay-epochs", type=_float, default=90, help="epoch interval to decay LR")
    g.add_argument("--decay-milestones", type=_int, nargs="+", default=[90, 180, 270],
                   help="list of decay epoch indices for multistep lr. must be increasing")
    g.add_argument("--decay-rate", "--dr", type=_float, default=0.1, help="LR decay rate")
    g.add_argument("--warmup-epochs", type=_int, default=5, help="epochs to warmup LR, if scheduler supports")
    g.add_argument("--warmup-prefix", action="store_true", help="Exclude warmup period from decay schedule.")
    g.add_argument("--lr-one-epoch-late", action="store_true",
                   help="per-epoch schedules step one epoch late, as DeiT's main.py did for SN-Net's DeiT and LeViT "
                        "runs: epoch e trains at lr(e-1) (docs/snnet_compat.md, C35)")
    g.add_argument("--cooldown-epochs", type=_int, default=0,
                   help="epochs to cooldown LR at min_lr, after cyclic schedule ends")
    g.add_argument("--patience-epochs", type=_int, default=10, help="patience epochs for Plateau LR scheduler")

    g = p.add_argument_group("Augmentation and regularization")
    g.add_argument("--no-aug", action="store_true",
                   help="Disable all training augmentation, override other train aug args")
    g.add_argument("--scale", type=_float, nargs=2, default=[0.08, 1.0], help="Random resize scale")
    g.add_argument("--ratio", type=_float, nargs=2, default=[3.0 / 4.0, 4.0 / 3.0], help="Random resize aspect ratio")
    g.add_argument("--train-crop-mode", default="rrc", choices=("rrc", "rkrc", "rkrr", "src"),
                   help="Training crop: rrc (timm's random-resized crop, --scale/--ratio), rkrc/rkrr (timm's "
                        "keep-ratio variants) or src (DeiT-III's 3-Augment crop as SN-Netv2 trains: resize the short "
                        "side to the image size, random crop with 4 px reflect padding) (default: rrc)")
    g.add_argument("--hflip", type=_probability, default=0.5, help="Horizontal flip training aug probability")
    g.add_argument("--vflip", type=_probability, default=0.0, help="Vertical flip training aug probability")
    g.add_argument("--color-jitter", type=_float, default=0.4, help="Color jitter factor")
    g.add_argument("--aa", default=None, help="Use AutoAugment policy, e.g. rand-m9-mstd0.5-inc1 (default: none)")
    g.add_argument("--aug-repeats", type=_float, default=0,
                   help="Repeated augmentation: each training image drawn N times per epoch across the processes, "
                        "each copy augmented on its own (distributed training; DeiT uses 3). 0 (default): off; "
                        "1: the same sampler with one copy, i.e. each image once")
    g.add_argument("--aug-splits", type=_int, default=0, help="Number of augmentation splits (valid: 0 or >=2)")
    g.add_argument("--reprob", type=_probability, default=0.0, help="Random erase prob")
    g.add_argument("--remode", choices=("const", "rand", "pixel"), default="pixel", help="Random erase mode")
    g.add_argument("--recount", type=_positive_int, default=1, help="Random erase count")
    g.add_argument("--resplit", action="store_true", help="Do not random erase first (clean) augmentation split")
    g.add_argument("--mixup", type=_non_negative_float, default=0.0, help="mixup alpha, mixup enabled if > 0.")
    g.add_argument("--cutmix", type=_non_negative_float, default=0.0, help="cutmix alpha, cutmix enabled if > 0.")
    g.add_argument("--cutmix-minmax", type=_float, nargs=2, default=None,
                   help="cutmix min/max ratio, overrides alpha and enables cutmix if set (default: none)")
    g.add_argument("--mixup-prob", type=_probability, default=1.0,
                   help="Probability of performing mixup or cutmix when either/both is enabled")
    g.add_argument("--mixup-switch-prob", type=_probability, default=0.5,
                   help="Probability of switching to cutmix when both mixup and cutmix enabled")
    g.add_argument("--mixup-mode", choices=("batch", "pair", "elem"), default="batch",
                   help="How to apply mixup/cutmix params: per batch, pair or elem")
    g.add_argument("--mixup-off-epoch", type=_int, default=0, help="Turn off mixup after this epoch, disabled if 0")
    g.add_argument("--smoothing", type=_probability, default=0.1, help="Label smoothing")
    g.add_argument("--train-interpolation", default="random",
                   help="Training interpolation (random, bilinear, bicubic)")

    g = p.add_argument_group("Model exponential moving average")
    g.add_argument("--model-ema", action="store_true",
                   help="keep timm's ModelEmaV3 of the weights, updated after every optimizer step; it is validated "
                        "each epoch (its metric picks model_best), saved as state_dict_ema, restored by --resume, "
                        "and every stitch of it is evaluated into stitches_res_ema.txt (default: off)")
    g.add_argument("--model-ema-decay", type=_probability, default=0.9998, help="decay factor for model weights "
                   "moving average")
    g.add_argument("--model-ema-warmup", action="store_true", help="enable warmup for model EMA decay (default: "
                   "off)")

    g = p.add_argument_group("Batch norm")
    g.add_argument("--sync-bn", action="store_true",
                   help="Enable synchronized BatchNorm (torch SyncBatchNorm) in distributed runs; needs CUDA (this "
                        "torch has no SyncBatchNorm on CPU) and --sample-sync with several stitches (every process "
                        "must run the same BN layers); no effect on one process (default: off)")
    g.add_argument("--dist-bn", choices=("", "reduce", "broadcast"), default="reduce",
                   help="Distribute BatchNorm stats between nodes after each epoch ('broadcast', 'reduce', or '')")
    g.add_argument("--split-bn", action="store_true", help="Enable separate BN layers per augmentation split.")

    g = p.add_argument_group("Device, precision, distributed")
    g.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    g.add_argument("--amp", action="store_true", help="mixed precision via torch.amp (fp16 + GradScaler on CUDA, "
                   "bf16 on CPU); NVIDIA apex is not used")
    g.add_argument("--amp-dtype", choices=("", "float16", "bfloat16"), default="",
                   help="lower precision AMP dtype ('' = float16 on CUDA, bfloat16 on CPU)")
    g.add_argument("--no-amp-loss", action="store_true",
                   help="with --amp, compute the loss and the distillation teacher outside autocast, in fp32 "
                        "(SN-Net's Swin recipe); by default autocast covers forward and loss (DeiT, LeViT, CNN)")
    g.add_argument("-j", "--workers", type=_int, default=4,
                   help="how many data loading worker processes to use, per training process (default: timm's 4, "
                        "at most the usable cores)")
    g.add_argument("--pin-mem", action="store_true",
                   help="Pin CPU memory in DataLoader for more efficient (sometimes) transfer to GPU.")
    g.add_argument("--no-prefetcher", action="store_true", help="disable fast prefetcher")
    g.add_argument("--dist-backend", default=None, help="default: nccl on CUDA, gloo on CPU")
    g.add_argument("--dist-url", default=None, help="accepted for timm compatibility; unused: the process group is "
                   "set up from torchrun's environment")

    g = p.add_argument_group("Output and logging")
    g.add_argument("--seed", type=_int, default=42, help="random seed")
    g.add_argument("--output", default="", help="path to output folder ('' = ./output/train)")
    g.add_argument("--experiment", default="", help="name of train experiment, name of sub-folder for output "
                   "('' = <date>-<model>-<img size>)")
    g.add_argument("--log-interval", type=_positive_int, default=50,
                   help="how many batches to wait before logging training status")
    g.add_argument("--checkpoint-hist", type=_non_negative_int, default=10,
                   help="number of best epoch checkpoints to keep as checkpoint-<epoch>.pth.tar (0: none)")
    g.add_argument("--recovery-interval", type=_non_negative_int, default=0,
                   help="write recovery.pth.tar every N training steps (0: off); --resume or --auto-resume from it "
                        "continues inside the epoch exactly")
    g.add_argument("--eval-metric", default="top1",
                   help="metric that picks model_best: top1, top5, loss (means over the validation panel) or "
                        "top1@<cfg_id> (one stitch of the panel); the training loss when there is no val split")
    g.add_argument("--val-interval", type=_positive_int, default=1, help="validate every N epochs")
    g.add_argument("--log-tensorboard", default="", metavar="DIR",
                   help="TensorBoard event files in DIR/<experiment> (rank 0): per epoch train loss, LR, panel "
                        "top-1 per stitch, front hypervolume; at the end the front as table and figure ('' = off; "
                        "needs pip install tensorboard)")
    g.add_argument("--log-wandb", action="store_true",
                   help="log the same to Weights & Biases (rank 0; files in <output>/<experiment>/wandb; "
                        "WANDB_MODE=offline for `wandb sync` later; default off; needs pip install wandb)")
    g.add_argument("--wandb-project", default="snnet", help="wandb project of --log-wandb")
    return p


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, StitchConfig | None]:
    """train.py's arguments and stitch config, by timm's two-stage parse: a pre-parser reads -c and --stitch_config;
    the YAML's keys, then the stitch config's fields become parser defaults (each replacing the last); the command
    line is parsed last, so what is typed wins."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    pre = _Parser(add_help=False, allow_abbrev=False)
    _add_config_flags(pre)
    files, _ = pre.parse_known_args(argv)
    if files.config:
        source = f"-c/--config {files.config!r}"
        parser.set_defaults(**_checked_defaults(parser, source, "key", _yaml_entries(files.config)))
    stitch_path = files.stitch_config or parser.get_default("stitch_config")  # a YAML may name the stitch config
    stitch_cfg = load_stitch_config(stitch_path) if stitch_path else None
    if stitch_cfg is not None:
        source = f"stitch config {stitch_path!r}"
        parser.set_defaults(**_checked_defaults(parser, source, "field", _stitch_entries(stitch_cfg)))
    args = parser.parse_args(argv)

    if stitch_cfg is None and args.model is None:
        raise UsageError("give --stitch_config FILE (an SN-Net) or --model NAME (one plain timm model)")
    if stitch_cfg is not None and args.model:
        raise UsageError(f"--model {args.model!r} and --stitch_config are exclusive: the config names the anchors")
    if args.snnet_compat and args.ls_mode is None:  # SN-Net's init unless a mode was chosen
        args.ls_mode = "snnet"
    args.data_dir = args.data_dir or args.data
    if not args.data_dir:
        raise UsageError("no dataset: give the dataset folder as the first argument (e.g. train.py /data/imagenet)")
    _fit_short_run(args, argv)
    _check_values(args)
    return args, stitch_cfg


def _fit_short_run(args: argparse.Namespace, argv: Sequence[str]) -> None:
    """Defaults that would misfit this run, fitted with one line each (issue 41): a warm-up not shorter than the run
    (`snnet.train.optim.fit_warmup`), more loader workers than cores (`snnet.data.loaders.default_workers`)."""
    # imported here: parsing alone (snnet --help) imports neither timm nor torch
    from snnet.data.loaders import TIMM_WORKERS, default_workers
    from snnet.train.optim import fit_warmup
    notes = []
    typed = any(a == "--warmup-epochs" or a.startswith("--warmup-epochs=") for a in argv)
    args.warmup_epochs, note = fit_warmup(args.warmup_epochs, args.epochs, typed)
    notes.append(note)
    typed = any(re.match(r"(-j\d*|--workers(=.*)?)$", a) for a in argv)
    if not typed and args.workers == TIMM_WORKERS:  # timm's default (a config's other number is its choice)
        args.workers, note = default_workers()
        notes.append(note)
    if int(os.environ.get("RANK", "0")) == 0:
        for note in filter(None, notes):
            logging.getLogger("snnet").info(note)


#: SN-Net's untagged teacher name meant DeiT's RegNetY-16GF (timm's default tag for it is now another checkpoint)
_SNNET_TEACHER = {"regnety_160": "regnety_160.deit_in1k"}


def _stitch_entries(cfg: StitchConfig) -> list[tuple[str, str, Any]]:
    """(field, dest, value) for the stitch config's fields that are flags (config.FIELDS' dest column), then its
    "recipe" entries (flag names); a flag set by both is refused, so a recipe card reads one way."""
    entries = []
    for name, value in cfg.values.items():
        if name not in ARG_DESTS:
            continue
        if name == "data_set" and value.upper() == "IMNET":  # SN-Net's ImageNet loader = timm's folder dataset ''
            value = ""
        if name == "teacher_model":  # docs/snnet_compat.md, C19
            value = _SNNET_TEACHER.get(value, value)
        entries.append((name, ARG_DESTS[name], value))
    if "lr" in cfg.values:  # SN-Net's lr is per 512 images of global batch, scaled linearly (docs/snnet_compat.md, C16)
        entries += [("lr", "lr_base_size", 512), ("lr", "lr_base_scale", "linear")]
    fields = {dest: name for name, dest, _ in entries}
    for key, value in (cfg.get("recipe") or {}).items():
        dest = str(key).replace("-", "_")
        if dest in fields:
            raise UsageError(f"stitch config {cfg.path!r}: recipe entry {key!r} sets what field {fields[dest]!r} "
                              f"already sets; keep one of them")
        entries.append((f"recipe.{key}", dest, value))
    return entries


#: parser dests that a file cannot set: -c names the YAML itself and is not followed from inside one
_NOT_FILE_KEYS = {"help", "config"}


def _checked_defaults(parser: argparse.ArgumentParser, source: str, noun: str,
                      entries: Iterable[tuple[str, str, Any]]) -> dict[str, Any]:
    """{dest: value} for parser.set_defaults from a file's (key, dest, value) triples. set_defaults skips type= and
    choices=, so each value is checked here as strictly as if it had been typed."""
    actions = {a.dest: a for a in parser._actions if a.dest not in _NOT_FILE_KEYS}
    out = {}
    for key, dest, value in entries:
        action = actions.get(dest)
        if action is None:
            raise UsageError(f"{source}: unknown {noun} {key!r}; keys are train.py flag names")
        try:
            out[dest] = _coerce(action, value)
        except argparse.ArgumentTypeError as e:
            flag = "/".join(action.option_strings) or action.metavar
            raise UsageError(f"{source}: {noun} {key!r}: {e} (as for {flag}); fix the value in the file") from None
    return out


def _coerce(action: argparse.Action, value: Any) -> Any:
    """A file's value for `action`, converted and checked like the typed flag (nargs, type, choices)."""
    if value is None and action.default is None:  # null = 'not set', valid where that is the built-in default
        return None
    if action.nargs == 0:  # store_true: a YAML 1 or 'yes' string would be a typo, not a switch
        if not isinstance(value, bool):
            raise argparse.ArgumentTypeError(f"{value!r} is not true or false")
        return value
    if isinstance(action, _KwargsAction):
        if not (isinstance(value, dict) and all(isinstance(k, str) for k in value)):
            raise argparse.ArgumentTypeError(f"{value!r} is not a mapping of argument names to values, e.g. "
                                             f"{{depth: 6}}")
        return dict(value)
    if action.nargs in (None, "?"):
        return _coerce_one(action, value)
    if not isinstance(value, list):
        raise argparse.ArgumentTypeError(f"{value!r} is not a list; write a list, e.g. [{value!r}]")
    n = action.nargs
    if (n == "+" and not value) or (isinstance(n, int) and len(value) != n):
        raise argparse.ArgumentTypeError(f"{value!r} has {len(value)} item(s); give {'at least 1' if n == '+' else n}")
    return [_coerce_one(action, v) for v in value]


def _coerce_one(action: argparse.Action, value: Any) -> Any:
    if value is None:
        raise argparse.ArgumentTypeError("null is not allowed here; give a value or delete the entry")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise argparse.ArgumentTypeError(f"{value!r} is not a single {'number' if action.type else 'value'}")
    # through the text form, so that a file's 2.5 for an integer flag fails exactly as a typed 2.5 does
    convert: Any = action.type or str  # argparse types it as a str or a callable
    v = convert(str(value))
    if action.choices is not None and v not in action.choices:
        raise argparse.ArgumentTypeError(f"{v!r} is not one of {', '.join(map(repr, action.choices))}")
    return v


#: resize interpolations timm's transforms know ("random" for training only)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")


def _check_ranges(args: argparse.Namespace) -> None:
    """Numbers that timm and torch accept without a word but that would change the run: refused by name."""
    def refuse(flag: str, value, why: str) -> None:
        raise UsageError(f"{flag} {value}: {why}")

    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:
        refuse("--crop-pct", args.crop_pct, "must be in (0, 1] (the fraction of the resized image kept; 0 would "
                                            "silently become the model's own)")
    if args.decay_rate < 0:
        refuse("--decay-rate", args.decay_rate, "must be >= 0 (a negative rate makes the LR negative)")
    if not 0 <= args.momentum <= 1:
        refuse("--momentum", args.momentum, "must be in [0, 1]")
    for flag, pair in (("--scale", args.scale), ("--ratio", args.ratio)):
        if pair is not None and (pair[0] > pair[1] or pair[0] <= 0):
            refuse(flag, " ".join(map(str, pair)), "must be MIN MAX with 0 < MIN <= MAX")
    if args.model_ema and args.model_ema_decay >= 1:
        refuse("--model-ema-decay", args.model_ema_decay, "must be below 1 (at 1 the EMA never moves from the start)")
    if args.seed < 0:
        refuse("--seed", args.seed, "must be >= 0 (numpy and torch seed with unsigned integers)")
    channels = args.in_chans or 3
    for flag, values in (("--mean", args.mean), ("--std", args.std)):
        if values is not None and len(values) not in (1, channels):
            refuse(flag, " ".join(map(str, values)), f"give 1 or {channels} values (one per input channel)")
    if args.std is not None and any(v <= 0 for v in args.std):
        refuse("--std", " ".join(map(str, args.std)), "every value must be > 0 (images are divided by it)")
    if args.interpolation not in INTERPOLATIONS + ("",):
        refuse("--interpolation", repr(args.interpolation), f"use one of {', '.join(INTERPOLATIONS)} ('' keeps the "
                                                             f"model's)")
    if args.train_interpolation not in INTERPOLATIONS + ("random",):
        refuse("--train-interpolation", repr(args.train_interpolation),
               f"use one of {', '.join(INTERPOLATIONS)} or random")
    if args.sched in ("step", "multistep") and args.decay_epochs <= 0:
        refuse("--decay-epochs", args.decay_epochs, f"must be > 0 with --sched {args.sched}")
    if args.opt_betas is not None and (len(args.opt_betas) not in (1, 2) or not all(0 <= b < 1 for b in args.opt_betas)):
        refuse("--opt-betas", " ".join(map(str, args.opt_betas)), "give one or two betas in [0, 1), e.g. 0.9 0.999")
    if args.cooldown_epochs < 0:
        refuse("--cooldown-epochs", args.cooldown_epochs, "must be >= 0")
    if args.aug_repeats < 0 or args.aug_repeats != int(args.aug_repeats):
        refuse("--aug-repeats", f"{args.aug_repeats:g}", "must be a whole number >= 0: 0 draws each training image "
               "once per epoch; N >= 1 (distributed runs) draws it N times across the processes, each copy augmented "
               "on its own (timm's RepeatAugSampler; DeiT uses 3, and 1 is the plain once-per-epoch draw)")
    if args.start_epoch is not None and not args.eval and not 0 <= args.start_epoch < args.epochs:
        refuse("--start-epoch", args.start_epoch, f"leaves no epoch to train of --epochs {args.epochs}; use 0.."
                                                  f"{args.epochs - 1}, or raise --epochs")


def _check_values(args: argparse.Namespace) -> None:
    _check_ranges(args)
    if args.workers < 0:
        raise UsageError(f"-j/--workers {args.workers} must be >= 0")
    if args.split_bn and not (args.aug_splits > 1 or args.resplit):
        raise UsageError("--split-bn needs --aug-splits > 1 or --resplit (timm's rule); add --resplit")
    if args.val_stitches is not None and any(c != "all" and c < 0 for c in args.val_stitches):
        raise UsageError(f"--val-stitches {args.val_stitches} must be cfg_ids >= 0 or 'all'")
    if not re.fullmatch(r"none|all|(anchors|\d+)(,(anchors|\d+))*", args.save_predictions):
        raise UsageError(f"--save-predictions {args.save_predictions!r} is not anchors, all, none or comma-separated "
                         f"cfg_ids (e.g. anchors,9)")
    restarted = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0" or slurm.restart_count() > 0
    if (args.auto_resume or restarted) and not args.experiment and not args.eval:
        raise UsageError("--auto-resume (and torchrun --max-restarts, a requeued Slurm job) needs --experiment NAME, "
                         "so that a restarted run finds its own checkpoint")
    if not re.fullmatch(r"top1|top5|loss|top1@\d+", args.eval_metric):
        raise UsageError(f"--eval-metric {args.eval_metric!r} is not a metric of the validation panel; use top1, top5, "
                         f"loss (means over the panel) or top1@<cfg_id> (one stitch of the panel)")
    if args.freeze_anchors and not args.stitch_config and not args.eval:
        raise UsageError("--freeze-anchors with a plain --model leaves nothing to train (it has no stitching layers); "
                         "drop --freeze-anchors or give --stitch_config")
    if args.torchcompile:
        import torch._dynamo
        backends = torch._dynamo.list_backends(exclude_tags=())
        if args.torchcompile not in backends:
            raise UsageError(f"--torchcompile {args.torchcompile!r} is not a torch.compile backend here; use one of "
                             f"{', '.join(sorted(backends))}")
    if args.distillation_type != "none" and not args.teacher:
        raise UsageError(f"--distillation-type {args.distillation_type} needs --teacher NAME")


def unique_key_loader():
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice; keep one",
                                                            key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)
    return Loader


def _yaml_entries(path: str) -> list[tuple[str, str, Any]]:
    """(key, dest, value) of a -c YAML file: keys are flag names, with - or _ (batch-size or batch_size)."""
    import yaml
    if not os.path.isfile(path):
        raise UsageError(f"-c/--config {path!r} does not exist; give an existing YAML file")
    try:
        with open(path) as f:
            data = yaml.load(f, Loader=unique_key_loader()) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"-c/--config {path!r} is not valid YAML ({' '.join(str(e).split())[:200]}); fix the "
                         f"file") from None
    if not isinstance(data, dict):
        raise UsageError(f"-c/--config {path!r} must hold a mapping of flag names to values")
    return [(str(k), str(k).replace("-", "_"), v) for k, v in data.items()]


__all__ = ["build_parser", "parse_args", "options_from", "UsageError", "ConfigError"]


class FrozenArgs(argparse.Namespace):
    """A run's arguments once resolved (command line, -c YAML, stitch config and recipe, then what the run derives
    before any work: device, classes, resume checkpoint): read-only, so what args.yaml records is what every phase
    reads. Make one with `freeze`."""

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"args.{name} is resolved once before the run starts (args.yaml) and is read-only; "
                             f"derive a local value instead")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"args.{name} is read-only")


def freeze(args: argparse.Namespace, **resolved: Any) -> FrozenArgs:
    """`args` with `resolved` values set, frozen (a copy; `args` itself is not changed)."""
    out = FrozenArgs.__new__(FrozenArgs)
    out.__dict__.update({**vars(args), **resolved})
    return out


def options_from(cls: type[T], args: argparse.Namespace, **over: Any) -> T:
    """A typed option object (a dataclass: `snnet.data.options.DataOptions`, `LoaderOptions`, ...) from train.py's
    resolved arguments: each field read from the flag of its name (a field train.py has no flag for keeps its
    default), `over` over them. The one place a namespace becomes options; below the entry points no function takes
    a namespace."""
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = set(over) - names
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
    values = {n: getattr(args, n) for n in names if hasattr(args, n)}
    for n, v in values.items():  # argparse gives lists (nargs), the options hold tuples
        if isinstance(v, list):
            values[n] = tuple(v)
    return cls(**{**values, **over})
