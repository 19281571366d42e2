"""Training's options as typed objects, each option declared once as a field with its train.py flag
(`snnet.utils.options.option`): the optimizer and its LR rule (`OptimOptions`), the LR schedule (`ScheduleOptions`),
the loss (`LossOptions`), the loop (`TrainOptions`), validation (`EvalOptions`), the input (`InputOptions`), the
network (`NetworkOptions`), the loggers (`LoggerOptions`) and what this invocation does (`JobOptions`: config
files, resume, dry run, LS init, output). train.py's parser is derived from these classes and the data layer's
(`snnet.train.args.build_parser`), so there is nothing to keep equal; train.py builds them from its resolved
arguments once (`RunOptions.from_values`) and every other tool (stitch-train, a Python caller) directly, by
keyword (`options_by_key` checks the keys, the value types and the flags' rules). The flags a stitch config sets
(lr, epochs, ls_mode, ...) are declared in `snnet.stitching.config.ConfigFlags` and copied here with `shared`."""
from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from snnet.data.options import (
    BATCH_SIZE,
    GRAD_ACCUM_STEPS,
    NO_PREFETCHER,
    NUM_CLASSES,
    SEED,
    DataOptions,
    LoaderOptions,
)
from snnet.stitching.config import CONFIG_FLAGS
from snnet.utils.options import (
    AUGMENT,
    BATCH_NORM,
    DEVICE,
    EMA,
    FILES,
    MODEL,
    OPTIMIZER,
    OUTPUT,
    SCHEDULE,
    STITCHING,
    OptionError,
    flag_of,
    option,
    options_by_key,
    shared,
)

__all__ = ["EvalOptions", "FLAG_OPTIONS", "InputOptions", "JobOptions", "LoggerOptions", "LossOptions",
           "NetworkOptions", "OptimOptions", "OptionError", "RunOptions", "ScheduleOptions", "SelectionOptions",
           "TRAINING_OPTIONS",
           "TrainOptions", "options_by_key"]

#: options several of the objects below share
IMG_SIZE = CONFIG_FLAGS["img_size"]  # a stitch config's input_size sets it: declared in snnet.stitching.config
IN_CHANS = option(None, "--in-chans", rule="positive", group=MODEL,
                  help="Image input channels (default: the model's)")
NO_PRETRAINED = option(False, "--no-pretrained", group=MODEL, help="random anchors (no hub weights)")
LOG_INTERVAL = option(50, "--log-interval", rule="positive", group=OUTPUT,
                      help="how many batches to wait before logging training status")


@dataclass(frozen=True)
class OptimOptions:
    """The optimizer (timm's create_optimizer_v2), its parameter groups and the LR rule (absolute --lr, or
    --lr-base scaled to the global batch)."""
    opt: str = option("sgd", "--opt", group=OPTIMIZER, help="Optimizer (a timm.optim name)")
    # None: lr_base scaled from lr_base_size to the global batch
    lr: float | None = option(None, "--lr", rule="non_negative", group=SCHEDULE,
                              help="learning rate, absolute; overrides --lr-base if set (default: from --lr-base)")
    lr_base: float = shared(CONFIG_FLAGS["lr_base"])
    lr_base_size: int = option(256, "--lr-base-size", rule="positive", group=SCHEDULE,
                               help="base learning rate batch size (divisor; 512 when the stitch config holds lr)")
    # '' : sqrt for adaptive optimizers (ada*, lamb), else linear
    lr_base_scale: str = option("", "--lr-base-scale", choices=("", "linear", "sqrt"), group=SCHEDULE,
                                help="base learning rate vs batch_size scaling ('linear', 'sqrt', based on opt if "
                                     "empty)")
    weight_decay: float = option(2e-5, "--weight-decay", rule="non_negative", group=OPTIMIZER, help="weight decay")
    momentum: float = option(0.9, "--momentum", rule="probability", group=OPTIMIZER, help="Optimizer momentum")
    opt_eps: float | None = option(None, "--opt-eps", group=OPTIMIZER,
                                   help="Optimizer Epsilon (default: the optimizer's)")
    opt_betas: tuple[float, ...] | None = option(None, "--opt-betas", nargs="+", group=OPTIMIZER,
                                                 help="Optimizer Betas (default: the optimizer's)")
    layer_decay: float | None = option(None, "--layer-decay", rule="positive", metavar="RATE", group=OPTIMIZER,
                                       help="layer-wise LR decay: an anchor parameter's LR x RATE ** (depth - layer), "
                                            "layer 0 the stem, 1..n the blocks, n+1 = depth the norm and head, times "
                                            "--anchor-lr-scale; stitching layers keep x1 (default: off)")
    anchor_lr_scale: float | None = option(None, "--anchor-lr-scale", rule="non_negative", group=STITCHING,
                                           help="LR multiplier of the anchors (default 1; SN-Net: 0.1 for Swin and "
                                                "CNNs, 1 for DeiT/LeViT)")
    clip_grad: float | None = option(None, "--clip-grad", rule="non_negative", group=OPTIMIZER,
                                     help="Clip gradient norm (default: no clipping)")
    clip_mode: str = option("norm", "--clip-mode", choices=("norm", "value", "agc"), group=OPTIMIZER,
                            help="Gradient clipping mode")
    # SN-Net's parameter groups (docs/snnet_compat.md, C18)
    snnet_compat: bool = option(False, "--snnet-compat", group=STITCHING,
                                help="reproduce SN-Net's accidents too: the anchors' no-weight-decay parameters "
                                     "(cls_token, pos_embed, relative-position tables, attention biases) are decayed, "
                                     "and the LS init is --ls-mode snnet unless --ls-mode is given "
                                     "(docs/snnet_compat.md, C35)")


@dataclass(frozen=True)
class ScheduleOptions:
    """The LR schedule (timm's create_scheduler_v2 under train.py's flag names) and its warm-up and floor."""
    sched: str = option("cosine", "--sched", group=SCHEDULE, help="LR scheduler")
    epochs: int = shared(CONFIG_FLAGS["epochs"])
    decay_epochs: float = option(90, "--decay-epochs", group=SCHEDULE, help="epoch interval to decay LR")
    decay_milestones: tuple[int, ...] = option((90, 180, 270), "--decay-milestones", nargs="+", group=SCHEDULE,
                                               help="list of decay epoch indices for multistep lr. must be increasing")
    decay_rate: float = option(0.1, "--decay-rate", "--dr", rule="non_negative", group=SCHEDULE,
                               help="LR decay rate")
    warmup_epochs: int = option(5, "--warmup-epochs", rule="non_negative", group=SCHEDULE,
                                help="epochs to warmup LR, if scheduler supports")
    warmup_lr: float = shared(CONFIG_FLAGS["warmup_lr"])
    warmup_prefix: bool = option(False, "--warmup-prefix", group=SCHEDULE,
                                 help="Exclude warmup period from decay schedule.")
    cooldown_epochs: int = option(0, "--cooldown-epochs", rule="non_negative", group=SCHEDULE,
                                  help="epochs to cooldown LR at min_lr, after cyclic schedule ends")
    patience_epochs: int = option(10, "--patience-epochs", group=SCHEDULE,
                                  help="patience epochs for Plateau LR scheduler")
    min_lr: float = shared(CONFIG_FLAGS["min_lr"])
    scale_warmup_min_lr: bool = option(False, "--scale-warmup-min-lr", group=SCHEDULE,
                                       help="scale --warmup-lr and --min-lr with the global batch like an LR from "
                                            "--lr-base (SN-Net's Swin recipe scaled all three; DeiT and LeViT scaled "
                                            "only the LR)")
    sched_on_updates: bool = option(False, "--sched-on-updates", group=SCHEDULE,
                                    help="Apply LR scheduler step on update instead of epoch end.")
    lr_one_epoch_late: bool = option(False, "--lr-one-epoch-late", group=SCHEDULE,
                                     help="per-epoch schedules step one epoch late, as DeiT's main.py did for SN-Net's "
                                          "DeiT and LeViT runs: epoch e trains at lr(e-1) (docs/snnet_compat.md, C35)")


@dataclass(frozen=True)
class LossOptions:
    """The training loss: label smoothing, mixup/cutmix and distillation."""
    smoothing: float = option(0.1, "--smoothing", rule="probability", group=AUGMENT, help="Label smoothing")
    mixup: float = option(0.0, "--mixup", rule="non_negative", group=AUGMENT,
                          help="mixup alpha, mixup enabled if > 0.")
    cutmix: float = option(0.0, "--cutmix", rule="non_negative", group=AUGMENT,
                           help="cutmix alpha, cutmix enabled if > 0.")
    cutmix_minmax: tuple[float, ...] | None = option(None, "--cutmix-minmax", nargs=2, group=AUGMENT,
                                                     help="cutmix min/max ratio, overrides alpha and enables cutmix "
                                                          "if set (default: none)")
    mixup_prob: float = option(1.0, "--mixup-prob", rule="probability", group=AUGMENT,
                               help="Probability of performing mixup or cutmix when either/both is enabled")
    mixup_switch_prob: float = option(0.5, "--mixup-switch-prob", rule="probability", group=AUGMENT,
                                      help="Probability of switching to cutmix when both mixup and cutmix enabled")
    mixup_mode: str = option("batch", "--mixup-mode", choices=("batch", "pair", "elem"), group=AUGMENT,
                             help="How to apply mixup/cutmix params: per batch, pair or elem")
    mixup_off_epoch: int = option(0, "--mixup-off-epoch", group=AUGMENT,
                                  help="Turn off mixup after this epoch, disabled if 0")
    distillation_type: str = shared(CONFIG_FLAGS["distillation_type"])
    distillation_alpha: float = option(0.5, "--distillation-alpha", rule="probability", group=STITCHING,
                                       help="weight of the distillation loss")
    distillation_tau: float = option(1.0, "--distillation-tau", rule="positive", group=STITCHING,
                                     help="temperature of soft distillation")
    teacher: str = shared(CONFIG_FLAGS["teacher"])
    teacher_checkpoint: str = option("", "--teacher-checkpoint", group=STITCHING,
                                     help="local weights of the teacher ('' = hub weights)")
    no_pretrained: bool = shared(NO_PRETRAINED)  # a teacher without checkpoint is random too (no download)
    num_classes: int | None = shared(NUM_CLASSES)


@dataclass(frozen=True)
class TrainOptions:
    """The training loop: batches and accumulation, precision, EMA, compile, seeds, logging and recovery."""
    batch_size: int = shared(BATCH_SIZE)
    grad_accum_steps: int = shared(GRAD_ACCUM_STEPS)
    amp: bool = option(False, "--amp", group=DEVICE,
                       help="mixed precision via torch.amp (fp16 + GradScaler on CUDA, bf16 on CPU); NVIDIA apex is "
                            "not used")
    # '': float16 on CUDA, bfloat16 elsewhere
    amp_dtype: str = option("", "--amp-dtype", choices=("", "float16", "bfloat16"), group=DEVICE,
                            help="lower precision AMP dtype ('' = float16 on CUDA, bfloat16 on CPU)")
    no_amp_loss: bool = option(False, "--no-amp-loss", group=DEVICE,
                               help="with --amp, compute the loss and the distillation teacher outside autocast, in "
                                    "fp32 (SN-Net's Swin recipe); by default autocast covers forward and loss (DeiT, "
                                    "LeViT, CNN)")
    model_ema: bool = option(False, "--model-ema", group=EMA,
                             help="keep timm's ModelEmaV3 of the weights, updated after every optimizer step; it is "
                                  "validated each epoch (its metric picks model_best), saved as state_dict_ema, "
                                  "restored by --resume, and every stitch of it is evaluated into "
                                  "stitches_res_ema.txt (default: off)")
    model_ema_decay: float = option(0.9998, "--model-ema-decay", rule="probability", group=EMA,
                                    help="decay factor for model weights moving average")
    model_ema_warmup: bool = option(False, "--model-ema-warmup", group=EMA,
                                    help="enable warmup for model EMA decay (default: off)")
    torchcompile: str | None = option(None, "--torchcompile", nargs="?", const="inductor", metavar="BACKEND",
                                      group=MODEL,
                                      help="torch.compile each route as one graph with BACKEND (bare flag: "
                                           "inductor), at its first training step; evaluation runs eagerly "
                                           "(default: off)")
    grad_checkpointing: bool = option(False, "--grad-checkpointing", group=MODEL,
                                      help="recompute each block's activations in the backward pass "
                                           "(torch.utils.checkpoint, non-reentrant) to save memory, while training "
                                           "only (default: off)")
    no_prefetcher: bool = shared(NO_PREFETCHER)  # batches come on the CPU: the loop moves them
    seed: int = shared(SEED)
    log_interval: int = shared(LOG_INTERVAL)
    recovery_interval: int = option(0, "--recovery-interval", rule="non_negative", group=OUTPUT,
                                    help="write recovery.pth.tar every N training steps (0: off); --resume or "
                                         "--auto-resume from it continues inside the epoch exactly")
    distributed: bool = False               # several processes (resolved from the launch), no flag
    dist_bn: str = option("reduce", "--dist-bn", choices=("", "reduce", "broadcast"), group=BATCH_NORM,
                          help="Distribute BatchNorm stats between nodes after each epoch ('broadcast', 'reduce', "
                               "or '')")
    freeze_anchors: bool = option(False, "--freeze-anchors", group=STITCHING,
                                  help="train only the stitching layers: anchors frozen and in eval mode (no "
                                       "BatchNorm or dropout updates, no optimizer state for them), SN-Netv2's cheap "
                                       "path")
    sample_sync: bool = option(False, "--sample-sync", group=STITCHING,
                               help="all processes train the same stitch each step (SN-Net: each draws its own)")
    start_epoch: int | None = option(None, "--start-epoch", group=SCHEDULE,
                                     help="manual epoch number (useful on restarts; default: the resumed "
                                          "checkpoint's, else 0)")
    no_resume_opt: bool = option(False, "--no-resume-opt", group=MODEL,
                                 help="prevent resume of optimizer state when resuming model")
    checkpoint_hist: int = option(10, "--checkpoint-hist", rule="non_negative", group=OUTPUT,
                                  help="number of best epoch checkpoints to keep as checkpoint-<epoch>.pth.tar "
                                       "(0: none)")
    # None: cuda when available, else cpu
    device: str | None = option(None, "--device", group=DEVICE, help="cuda, cpu, ... (default: cuda when available)")
    # SyncBatchNorm in a distributed training run (trainer.prepare)
    sync_bn: bool = option(False, "--sync-bn", group=BATCH_NORM,
                           help="Enable synchronized BatchNorm (torch SyncBatchNorm) in distributed runs; needs CUDA "
                                "(this torch has no SyncBatchNorm on CPU) and --sample-sync with several stitches "
                                "(every process must run the same BN layers); no effect on one process (default: "
                                "off)")
    split_bn: bool = option(False, "--split-bn", group=BATCH_NORM,
                            help="Enable separate BN layers per augmentation split.")
    channels_last: bool = option(False, "--channels-last", group=MODEL, help="Use channels_last memory layout")


@dataclass(frozen=True)
class EvalOptions:
    """Validation during training and the final evaluation of every stitch."""
    eval_metric: str = option("top1", "--eval-metric", rule="metric", group=OUTPUT,
                              help="metric that picks model_best: top1, top5, loss (means over the validation panel) "
                                   "or top1@<cfg_id> (one stitch of the panel); the training loss when there is no "
                                   "val split")
    # None: the anchors and a few stitches
    val_stitches: tuple[int | str, ...] | None = option(None, "--val-stitches", nargs="*", kind="stitch_id",
                                                        rule="non_negative", group=STITCHING,
                                                        help="cfg_ids validated after every epoch, or 'all' (every "
                                                             "stitch, one pass; summary.csv then also gets the "
                                                             "front's hypervolume, front_hv) (default: anchors and a "
                                                             "few stitches)")
    val_interval: int = option(1, "--val-interval", rule="positive", group=OUTPUT,
                               help="validate every N epochs and after the last")
    save_predictions: str = option("anchors", "--save-predictions", metavar="WHICH", rule="stitches", group=STITCHING,
                                   help="with the final evaluation of every stitch, save per-image predictions "
                                        "(top-5 classes, top softmax probability, correct) of these stitches next to "
                                        "stitches_res.txt as stitches_pred.npz, for `snnet pareto --baselines`: "
                                        "anchors (default), all, none, or comma-separated cfg_ids (anchors,9,12 works "
                                        "too)")
    log_interval: int = shared(LOG_INTERVAL)


@dataclass(frozen=True)
class InputOptions:
    """What the network is fed: image size, channels and the preprocessing that overrides the model's defaults
    (timm's resolve_data_config reads them)."""
    img_size: int | None = shared(IMG_SIZE)
    in_chans: int | None = shared(IN_CHANS)
    crop_pct: float | None = option(None, "--crop-pct", rule="fraction", group=MODEL,
                                    help="Input image center crop percent (for validation only; default: the "
                                         "model's)")
    interpolation: str = option("", "--interpolation", rule="interpolation", group=MODEL,
                                help="Image resize interpolation type (overrides model; '' keeps the model's)")
    mean: tuple[float, ...] | None = option(None, "--mean", nargs="+", group=MODEL,
                                            help="Override mean pixel value of dataset (default: the model's)")
    std: tuple[float, ...] | None = option(None, "--std", nargs="+", rule="positive", group=MODEL,
                                           help="Override std deviation of dataset (default: the model's)")

    def data_config_args(self) -> dict[str, Any]:
        """The `args` mapping of timm's resolve_data_config."""
        return {k: getattr(self, k) for k in ("img_size", "in_chans", "crop_pct", "interpolation", "mean", "std")}


@dataclass(frozen=True)
class SelectionOptions:
    """What a ``"positions": {"select": ...}`` selection reads besides the config: the training data (its folder;
    its seed draws the images), timm's data-config flags (the images' preprocessing: img_size, mean, std, crop_pct,
    interpolation, ... as `resolve_data_config` reads them), how many images (None: the config's stitch_init_bs)
    and where the maps are computed (None: cpu)."""
    data: DataOptions
    data_config: Mapping[str, Any] = field(default_factory=dict)
    init_images: int | None = None
    device: str | None = None


@dataclass(frozen=True)
class NetworkOptions:
    """What the network is built from besides the stitch config: the model flags, the number of classes, and what
    a config that selects its positions from data reads (`selection`; None: such a config is refused)."""
    num_classes: int | None = shared(NUM_CLASSES)
    # one plain timm model (no stitch config)
    model: str | None = option(None, "--model", group=MODEL,
                               help="Name of model to train: one plain timm model instead of an SN-Net (exclusive "
                                    "with --stitch_config)")
    # over every anchor's own
    model_kwargs: Mapping[str, Any] = option({}, "--model-kwargs", nargs="*", kind="kwargs", metavar="K=V",
                                             group=MODEL, help="extra timm.create_model arguments for the model / "
                                                               "every anchor, e.g. depth=6")
    pretrained: bool = option(False, "--pretrained", group=MODEL,  # the plain model's hub weights
                              help="Start with pretrained version of specified network (if avail); plain --model "
                                   "only")
    no_pretrained: bool = shared(NO_PRETRAINED)  # random anchors
    img_size: int | None = shared(IMG_SIZE)
    in_chans: int | None = shared(IN_CHANS)
    # None: the model's own
    drop: float | None = option(None, "--drop", rule="probability", group=MODEL,
                                help="Dropout rate (default: the model's)")
    drop_path: float | None = option(None, "--drop-path", rule="probability", group=MODEL,
                                     help="Drop path rate (default: the model's)")
    selection: SelectionOptions | None = None
    # the data's class names by index (resolved from the dataset, no flag): recorded in the checkpoint's arguments
    # so an export, `snnet serve` and the Python API name what they predict
    class_names: list[str] | None = None


@dataclass(frozen=True)
class LoggerOptions:
    """The experiment loggers a run asks for and the run's configuration they record (`run_config`: its resolved
    arguments, JSON-able)."""
    # TensorBoard's folder ('' = off)
    log_tensorboard: str = option("", "--log-tensorboard", metavar="DIR", group=OUTPUT,
                                  help="TensorBoard event files in DIR/<experiment> (rank 0): per epoch train loss, "
                                       "LR, panel top-1 per stitch, front hypervolume; at the end the front as table "
                                       "and figure ('' = off; needs pip install tensorboard)")
    log_wandb: bool = option(False, "--log-wandb", group=OUTPUT,
                             help="log the same to Weights & Biases (rank 0; files in <output>/<experiment>/wandb; "
                                  "WANDB_MODE=offline for `wandb sync` later; default off; needs pip install wandb)")
    wandb_project: str = option("snnet", "--wandb-project", group=OUTPUT, help="wandb project of --log-wandb")
    run_config: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class JobOptions:
    """What this invocation of train.py does: its config files, the dataset folder, where it starts from (resume,
    initial checkpoint), dry run or evaluation, the LS init, the process group and the output folder."""
    data: str | None = shared(CONFIG_FLAGS["data"])
    config: str = option("", "-c", "--config", metavar="FILE", group=FILES,
                         help="YAML config file specifying default arguments: keys are flag names (- or _), values "
                              "as typed; the stitch config and typed flags override it")
    stitch_config: str | None = option(None, "--stitch_config", "--stitch-config", metavar="FILE", group=FILES,
                                       help="stitch config JSON (SN-Net's files accepted as they are); its fields "
                                            "such as lr, epochs, input_size set flag defaults over -c; typed flags "
                                            "override it")
    initial_checkpoint: str = option("", "--initial-checkpoint", group=MODEL,
                                     help="Initialize model from this checkpoint (weights only)")
    resume: str = option("", "--resume", group=MODEL,
                         help="Resume full model and optimizer state from checkpoint (model, optimizer, scaler and "
                              "epoch)")
    auto_resume: bool = option(False, "--auto-resume", group=MODEL,
                               help="resume from <output>/<experiment>/last.pth.tar when it exists (always on when "
                                    "torchrun --max-restarts restarts the workers); needs --experiment")
    dry_run: bool = option(False, "--dry-run", group=STITCHING,
                           help="resolve the whole run (config layers, world size of the launch, LR per parameter "
                                "group, epochs, eval transform, teacher), print it as YAML (the args.yaml every run "
                                "writes) and exit without loading weights or reading images")
    eval: bool = option(False, "--eval", group=STITCHING,
                        help="evaluate every stitch and exit (with --resume: that checkpoint; without: the freshly "
                             "built, least-squares initialised SN-Net)")
    ls_mode: str | None = shared(CONFIG_FLAGS["ls_mode"])
    stitch_init_bs: int | None = shared(CONFIG_FLAGS["stitch_init_bs"])
    no_ls_init: bool = option(False, "--no-ls-init", group=STITCHING, help="keep the stitching layers' default init")
    dist_backend: str | None = option(None, "--dist-backend", group=DEVICE,
                                      help="default: nccl on CUDA, gloo on CPU")
    dist_url: str | None = option(None, "--dist-url", group=DEVICE,
                                  help="accepted for timm compatibility; unused: the process group is set up from "
                                       "torchrun's environment")
    output: str = option("", "--output", group=OUTPUT, help="path to output folder ('' = ./output/train)")
    experiment: str = shared(CONFIG_FLAGS["experiment"])


@dataclass(frozen=True)
class RunOptions:
    """One run's configuration, frozen: its options in typed sections (built once from the parsed values,
    `from_values`), and what the run derives from them and from the launch, filled in once by
    `snnet.train.resolve.resolve` before any work (world size, global batch, learning rates, output folder; the
    resolved device, resume checkpoint and classes go into their sections). `values` gives the flat mapping back
    (train.py's flag names), which args.yaml and every checkpoint record."""
    job: JobOptions
    data: DataOptions
    loader: LoaderOptions
    optim: OptimOptions
    schedule: ScheduleOptions
    loss: LossOptions
    train: TrainOptions
    eval: EvalOptions
    input: InputOptions
    network: NetworkOptions
    logging: LoggerOptions
    # resolved (`resolve`): the processes of the launch, images per optimizer step over all of them
    # (-b x processes x --grad-accum-steps), the absolute learning rates and the run's folder
    world_size: int = 1
    global_batch: int = 0
    lr: float = 0.0
    warmup_lr: float = 0.0
    min_lr: float = 0.0
    out_dir: Path = Path("output/train")

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> RunOptions:
        """Each section from the values of its fields' names (lists as tuples); a section field without a value
        keeps its default. The resolved fields keep theirs until `resolve`."""
        hints = typing.get_type_hints(cls)
        sections = {}
        for name in SECTIONS:
            section = hints[name]
            names = {g.name for g in dataclasses.fields(section)}
            sections[name] = section(**{n: tuple(v) if isinstance(v, list) else v
                                        for n, v in values.items() if n in names})
        return cls(**sections)

    def values(self) -> dict[str, Any]:
        """Every option's value by its flag's name, the sections' shared ones once: train.py's arguments."""
        out: dict[str, Any] = {}
        for name in SECTIONS:
            section = getattr(self, name)
            for g in dataclasses.fields(section):
                if flag_of(g) is not None:
                    out.setdefault(g.name, getattr(section, g.name))
        return out

    @property
    def device(self) -> torch.device:
        """The device this process runs on (--device as resolved: cuda:LOCAL_RANK or cpu)."""
        import torch  # here: parsing train.py's flags (snnet --help) does not load torch
        return torch.device(self.train.device or "cpu")

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The autocast dtype (None without --amp): --amp-dtype, by default fp16 on CUDA and bf16 elsewhere."""
        if not self.train.amp:
            return None
        import torch
        if self.train.amp_dtype:
            return getattr(torch, self.train.amp_dtype)
        return torch.float16 if self.device.type == "cuda" else torch.bfloat16

    def network_to_build(self) -> NetworkOptions:
        """The network section with what a selection of positions from data reads: the data, timm's data-config
        options (`InputOptions.data_config_args`), the LS init's image count and the device."""
        return dataclasses.replace(self.network, selection=SelectionOptions(
            self.data, self.input.data_config_args(), self.job.stitch_init_bs, self.train.device))

    def replaced(self, **values: Any) -> RunOptions:
        """The same run with `values` over its own: a resolved field by its name, an option in every section with a
        field of that name."""
        top = {k: values.pop(k) for k in list(values) if k in RESOLVED}
        sections = {name: getattr(self, name) for name in SECTIONS}
        known = {g.name for section in sections.values() for g in dataclasses.fields(section)}
        if set(values) - known:
            raise TypeError(f"RunOptions has no option(s) {sorted(set(values) - known)}")

        def over(section: Any) -> Any:
            names = {g.name for g in dataclasses.fields(section)}
            return dataclasses.replace(section, **{k: v for k, v in values.items() if k in names})
        return dataclasses.replace(self, **{name: over(section) for name, section in sections.items()}, **top)


#: RunOptions' sections (typed option objects) and its resolved fields
SECTIONS = ("job", "data", "loader", "optim", "schedule", "loss", "train", "eval", "input", "network", "logging")
RESOLVED = ("world_size", "global_batch", "lr", "warmup_lr", "min_lr", "out_dir")


#: every option object of a training run (the data layer's are `snnet.data.options`)
TRAINING_OPTIONS = (OptimOptions, ScheduleOptions, LossOptions, TrainOptions, EvalOptions, InputOptions)
#: every class that declares a train.py flag, in the order the parser is derived from them
FLAG_OPTIONS = (JobOptions, DataOptions, NetworkOptions, InputOptions, LoaderOptions, TrainOptions, EvalOptions,
                LossOptions, OptimOptions, ScheduleOptions, LoggerOptions)
