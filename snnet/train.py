"""train.py: build, least-squares initialise, train (DDP + AMP) and evaluate an SN-Net, the timm way.

    train.py DATA --stitch_config configs/deit_ti_s_b.json [timm flags]        # train, then evaluate every stitch
    train.py DATA --stitch_config ... --eval --resume CKPT                     # evaluate every stitch
    train.py DATA --model vit_tiny_patch16_224 [timm flags]                    # one plain model
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from .adapter import AnchorError
from .args import UsageError, parse_args
from .checkpoint import LAST, CheckpointError, CheckpointKeeper, load_checkpoint
from .config import ConfigError, StitchConfig
from .data import DataError, clean_images, create_datasets, create_eval_loader, create_train_loader, num_classes_of
from .engine import (RESULTS_FILE, NonFiniteLoss, PlainNet, ResultsError, ResultsFile, default_val_panel,
                     evaluate_stitches, file_sha256, load_model_state, model_state, text_sha256, train_one_epoch,
                     unwrap, world)
from .plan import PlanError
from .sampler import StitchSampler, seed_epoch

_logger = logging.getLogger("snnet")
USER_ERRORS = (UsageError, ConfigError, DataError, AnchorError, PlanError, CheckpointError, ResultsError)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        args, stitch_cfg = parse_args(argv)
        run(args, stitch_cfg)
    except USER_ERRORS as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"error: {e}; the last good checkpoint is kept", file=sys.stderr)
        return 3
    except BaseException:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # a peer crashed or the group broke: leave now. Interpreter teardown (process-group destructors) can
            # block on dead connections and keep torchrun from restarting the workers (--max-restarts)
            import traceback
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
        raise
    # only after a clean run: with a crashed peer, tearing the group down can block forever and keep torchrun
    # from restarting the workers
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


def one_line(e: BaseException) -> str:
    """The message of a user error on one line; errors re-raised from a DataLoader worker carry the worker's
    traceback text, whose last line is the original message."""
    text = str(e).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return " ".join(text.split())


# ------------------------------------------------------------------------------------------------------ building
def build_network(args: argparse.Namespace, stitch_cfg: StitchConfig | None, num_classes: int) -> nn.Module:
    kwargs = dict(num_classes=num_classes, drop_path_rate=args.drop_path, drop_rate=args.drop, **args.model_kwargs)
    if args.img_size is not None:
        kwargs["img_size"] = args.img_size
    if args.in_chans is not None:
        kwargs["in_chans"] = args.in_chans
    if stitch_cfg is None:
        from .build import create_anchor
        from .config import AnchorSpec
        model = create_anchor(AnchorSpec(args.model), pretrained=args.pretrained, **kwargs)
        return PlainNet(model, args.model)
    from .build import build_snnet
    return build_snnet(stitch_cfg, pretrained=not args.no_pretrained, **kwargs)


def resolve_device(args: argparse.Namespace) -> torch.device:
    from timm.utils import init_distributed_device
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available here; use --device cpu")
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt > 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        _init_restarted_group(args, attempt)
        local = int(os.environ.get("LOCAL_RANK", "0"))
        args.distributed, args.local_rank = True, local
        args.rank, args.world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if args.device.startswith("cuda"):
            args.device = f"cuda:{local}"
            torch.cuda.set_device(args.device)
        return torch.device(args.device)
    return init_distributed_device(args)


def _init_restarted_group(args: argparse.Namespace, attempt: int) -> None:
    """Process group of a torchrun --max-restarts retry, on a store of its own.

    Seen with torch 2.14 on CPU: restarted workers joining through the agent's store could hang in, or fail,
    the gloo rendezvous. Rank 0 hosts a fresh TCPStore on MASTER_PORT + 1 + attempt instead, so each attempt
    starts from an empty store."""
    from datetime import timedelta
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    port = int(os.environ["MASTER_PORT"]) + 1 + attempt
    store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], port, world_size, is_master=rank == 0,
                                       timeout=timedelta(minutes=10))
    backend = args.dist_backend or ("nccl" if args.device.startswith("cuda") else "gloo")
    torch.distributed.init_process_group(backend, store=store, rank=rank, world_size=world_size)


def amp_dtype_for(args: argparse.Namespace, device: torch.device) -> torch.dtype | None:
    if not args.amp:
        return None
    if args.amp_dtype:
        return getattr(torch, args.amp_dtype)
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def param_groups(net: nn.Module, weight_decay: float, anchor_lr_scale: float) -> list[dict]:
    """Anchors vs. stitching layers (LR scale), each split into decay / no-decay (1-D params, biases, the anchors'
    own no_weight_decay names, which SN-Net dropped: spec 6.1 item 7)."""
    skip = net.no_weight_decay() if hasattr(net, "no_weight_decay") else set()
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        is_anchor = not name.startswith("stitch_layers.")
        no_decay = p.ndim <= 1 or name.endswith(".bias") or name in skip
        groups.setdefault((is_anchor, no_decay), []).append(p)
    out = []
    for (is_anchor, no_decay), params in sorted(groups.items()):
        out.append({"params": params, "weight_decay": 0.0 if no_decay else weight_decay,
                    "lr_scale": anchor_lr_scale if is_anchor else 1.0})
    return out


def resolve_lr(args: argparse.Namespace, global_batch: int) -> float:
    if args.lr is not None:
        return args.lr
    scale = args.lr_base_scale or ("sqrt" if any(o in args.opt.lower() for o in ("ada", "lamb")) else "linear")
    ratio = global_batch / args.lr_base_size
    return args.lr_base * (ratio ** 0.5 if scale == "sqrt" else ratio)


def output_dir(args: argparse.Namespace) -> Path:
    if args.eval and args.resume and not (args.output or args.experiment):
        return Path(args.resume).resolve().parent  # results next to the checkpoint: a rerun continues there
    name = args.experiment
    if not name:
        stem = Path(args.stitch_config).stem if args.stitch_config else args.model
        name = f"eval-{stem}" if args.eval else f"{time.strftime('%Y%m%d-%H%M%S')}-{stem}-{args.img_size or 224}"
    return Path(args.output or "./output/train") / name


def _config_text(args: argparse.Namespace, stitch_cfg: StitchConfig | None, data_cfg: dict) -> str:
    ident = {"stitch_config": stitch_cfg.values if stitch_cfg else None,
             "anchors": [a.__dict__ for a in stitch_cfg.anchors] if stitch_cfg else [args.model],
             "input_size": list(data_cfg["input_size"]), "crop_pct": data_cfg["crop_pct"],
             "num_classes": args.num_classes, "amp": [args.amp, args.amp_dtype]}
    return json.dumps(ident, sort_keys=True, default=str)


# ------------------------------------------------------------------------------------------------------ the run
def run(args: argparse.Namespace, stitch_cfg: StitchConfig | None) -> None:
    from timm.data import resolve_data_config
    from timm.utils import random_seed

    device = resolve_device(args)
    rank, world_size = world()
    primary = rank == 0
    random_seed(args.seed, rank)
    if not primary:
        logging.getLogger().setLevel(logging.WARNING)

    need_train = not args.eval
    train_ds, val_ds = create_datasets(args, need_train=need_train)
    if args.num_classes is None:
        args.num_classes = num_classes_of(train_ds or val_ds) or (stitch_cfg.get("num_classes") if stitch_cfg else None)
    net = build_network(args, stitch_cfg, args.num_classes)
    names = list(net.names)
    is_snnet = stitch_cfg is not None
    data_cfg = resolve_data_config(vars(args), model=net, verbose=primary)
    if args.split_bn:
        from timm.layers import convert_splitbn_model
        net = convert_splitbn_model(net, max(args.aug_splits, 2))
    net.to(device)
    if args.channels_last:
        net.to(memory_format=torch.channels_last)
    if args.initial_checkpoint:
        load_model_state(net, load_checkpoint(args.initial_checkpoint)["state_dict"], args.initial_checkpoint)

    out_dir = output_dir(args)
    restarted = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"
    if not args.resume and not args.eval and (args.auto_resume or restarted) and (out_dir / LAST).exists():
        args.resume = str(out_dir / LAST)
        _logger.info(f"auto-resume: continuing from {args.resume}")
    resume_state = load_checkpoint(args.resume) if args.resume else None
    if is_snnet and resume_state is None and stitch_cfg.get("ls_init") and not args.no_ls_init:
        count = args.stitch_init_bs or stitch_cfg.get("stitch_init_bs")
        source = train_ds if train_ds is not None else val_ds
        from .ls_init import ls_init
        t0 = time.perf_counter()
        reports = ls_init(net, clean_images(source, data_cfg, count, args.seed, rank, world_size),
                          mode=args.ls_mode or stitch_cfg.get("ls_mode"))
        if reports:
            errs = [r.rel_error for r in reports]
            _logger.info(f"LS init: {len(reports)} stitching layers fitted on {count} clean images in "
                         f"{time.perf_counter() - t0:.1f}s; relative fit error mean {sum(errs) / len(errs):.4f} "
                         f"max {max(errs):.4f}")
    if resume_state is not None:
        load_model_state(net, resume_state["state_dict"], args.resume)

    amp_dtype = amp_dtype_for(args, device)
    config_text = _config_text(args, stitch_cfg, data_cfg)
    if args.eval:
        ckpt_hash = file_sha256(args.resume) if args.resume else text_sha256(f"init:{args.seed}:{config_text}")
        evaluate_all(net, val_ds, args, data_cfg, device, amp_dtype, out_dir, ckpt_hash, config_text)
        return
    train(net, train_ds, val_ds, args, stitch_cfg, data_cfg, device, amp_dtype, out_dir, resume_state, config_text)


def evaluate_all(net, val_ds, args, data_cfg, device, amp_dtype, out_dir: Path, ckpt_hash: str,
                 config_text: str) -> dict:
    """Every stitch on the validation set; one JSON line per stitch in <out_dir>/stitches_res.txt."""
    from .cost import count_flops
    if val_ds is None:
        raise DataError(f"no validation split in {args.data_dir!r} to evaluate the stitches on")
    rank, world_size = world()
    model = unwrap(net)
    results = ResultsFile(out_dir / RESULTS_FILE, ckpt_hash, text_sha256(config_text))
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        done = results.completed()
    else:
        done = {}
    if world_size > 1:  # every rank evaluates the same remaining stitches
        box = [sorted(done)]
        torch.distributed.broadcast_object_list(box, src=0)
        done = dict.fromkeys(box[0])
    todo = [c for c in range(model.num_configs) if c not in done]
    if not todo:
        _logger.info(f"all {model.num_configs} stitches already evaluated in {results.path}")
        return done
    size = data_cfg["input_size"][1:]
    if isinstance(model, PlainNet):
        was = model.training
        model.eval()
        with torch.no_grad():
            flops = {0: count_flops(model.model, model.model, torch.zeros(1, *data_cfg["input_size"], device=device))}
        model.train(was)
    else:
        table = model.cost_table(tuple(size), data_cfg["input_size"][0])
        flops = {c: table.route_flops(model.routes[c]) for c in todo}
    _logger.info(f"evaluating {len(todo)} stitch(es) ({len(done)} already in {results.path}) on "
                 f"{len(val_ds)} images, {world_size} process(es)")
    loader = create_eval_loader(val_ds, args, data_cfg, rank, world_size)
    metrics = evaluate_stitches(net, loader, todo, device, amp_dtype, args.log_interval)
    records = []
    for cfg_id, m in metrics.items():
        record = {"cfg_id": cfg_id, "flops": flops[cfg_id], "params": model.params(cfg_id), "acc1": m["acc1"],
                  "acc5": m["acc5"], "loss": m["loss"], "route": model.describe(cfg_id), "samples": m["samples"]}
        records.append(record)
        _logger.info(f"cfg {cfg_id:>3d} {record['route']}: acc1 {m['acc1']:.3f} acc5 {m['acc5']:.3f} "
                     f"loss {m['loss']:.4f} flops {record['flops'] / 1e9:.3f}G params {record['params'] / 1e6:.3f}M")
    if rank == 0:
        results.extend(records)
    if rank == 0:
        _logger.info(f"results: {results.path}")
    return metrics


def train(net, train_ds, val_ds, args, stitch_cfg, data_cfg, device, amp_dtype, out_dir: Path, resume_state,
          config_text: str) -> None:
    from timm.data import Mixup
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs
    from timm.utils import NativeScaler, distribute_bn, update_summary

    from .checkpoint import json_field
    from .losses import DistillationLoss, base_criterion

    rank, world_size = world()
    primary = rank == 0
    model = unwrap(net)
    if stitch_cfg is not None and not stitch_cfg.get("fulltune"):  # SN-Net: only stitching layers and cls tokens
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("stitch_layers.") or "cls" in name
    anchor_lr_scale = args.anchor_lr_scale if args.anchor_lr_scale is not None else 1.0
    lr = resolve_lr(args, args.batch_size * world_size)
    opt_kwargs = {}
    if args.opt_eps is not None:
        opt_kwargs["eps"] = args.opt_eps
    if args.opt_betas is not None:
        opt_kwargs["betas"] = tuple(args.opt_betas)
    try:
        optimizer = create_optimizer_v2(param_groups(model, args.weight_decay, anchor_lr_scale), opt=args.opt,
                                        lr=lr, weight_decay=args.weight_decay, momentum=args.momentum, **opt_kwargs)
    except ValueError as e:
        raise UsageError(f"--opt {args.opt!r}: {e}; see timm.optim.list_optimizers()") from None
    loss_scaler = NativeScaler(device=device.type) if amp_dtype == torch.float16 else None

    start_epoch, global_step = 0, 0
    if resume_state is not None:  # timm's semantics: the epoch always resumes, the optimizer unless --no-resume-opt
        start_epoch = int(resume_state.get("epoch", -1)) + 1
        global_step = int(resume_state.get("global_step", 0))
        if not args.no_resume_opt and "optimizer" in resume_state:
            optimizer.load_state_dict(resume_state["optimizer"])
            if loss_scaler is not None and resume_state.get("amp_scaler"):
                loss_scaler.load_state_dict(resume_state["amp_scaler"])
    if args.start_epoch is not None:
        start_epoch = args.start_epoch

    if args.distributed:
        ddp_kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
        # each process trains its own stitch, so parameters differ between processes (spec 1.4)
        net = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True, **ddp_kwargs)

    mixup_active = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    mixup_fn = None
    if mixup_active:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=args.num_classes)
    train_loader = create_train_loader(train_ds, args, data_cfg, device)
    teacher = build_teacher(args, device) if args.distillation_type != "none" else None
    loss_fn = DistillationLoss(base_criterion(mixup_active, args.smoothing), teacher, args.distillation_type,
                               args.distillation_alpha, args.distillation_tau).to(device)
    updates_per_epoch = len(train_loader)
    try:
        lr_scheduler, num_epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args),
                                                       updates_per_epoch=updates_per_epoch)
    except ValueError as e:
        raise UsageError(f"--sched {args.sched!r}: {e}; use cosine, tanh, step, multistep, plateau or poly") from None
    if start_epoch > 0:
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            lr_scheduler.step(start_epoch)

    sampler = StitchSampler(model.num_configs, args.seed, rank, sync=args.sample_sync)
    n_anchors = len(model.names)
    panel = args.val_stitches if args.val_stitches is not None else default_val_panel(model.num_configs, n_anchors)
    bad = [c for c in panel if c >= model.num_configs]
    if bad:
        raise UsageError(f"--val-stitches {bad} out of range: this network has cfg_ids 0..{model.num_configs - 1}")
    val_loader = create_eval_loader(val_ds, args, data_cfg, rank, world_size) if val_ds is not None else None

    keeper = CheckpointKeeper(out_dir, higher_is_better="loss" not in args.eval_metric)
    if resume_state is not None:
        keeper.best = resume_state.get("best_metric")
    if primary:
        out_dir.mkdir(parents=True, exist_ok=True)
        from .fileio import write_text_atomic
        write_text_atomic(out_dir / "args.json", json.dumps(vars(args), indent=1, sort_keys=True, default=str))
        _logger.info(f"output: {out_dir}; {model.num_configs} network(s); lr {lr:.3e} (anchors x{anchor_lr_scale}); "
                     f"{updates_per_epoch} steps/epoch; {world_size} process(es); amp {amp_dtype}")

    trainable = lambda: [p for p in model.parameters() if p.requires_grad]
    if primary:
        _truncate_summary(out_dir / "summary.csv", start_epoch)
    for epoch in range(start_epoch, num_epochs):
        seed_epoch(args.seed, rank, epoch)
        if args.distributed and hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        if mixup_fn is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
            mixup_fn.mixup_enabled = False
        train_loss, global_step = train_one_epoch(
            net, train_loader, optimizer, loss_fn, sampler, epoch, global_step, device, amp_dtype, loss_scaler,
            lr_scheduler, mixup_fn, args.clip_grad, args.clip_mode, args.log_interval, args.sched_on_updates,
            prefetcher=not args.no_prefetcher, parameters=trainable)
        if args.distributed and args.dist_bn in ("broadcast", "reduce"):
            distribute_bn(model, world_size, args.dist_bn == "reduce")
        eval_metrics, metric = {}, None
        if val_loader is not None and (epoch + 1) % args.val_interval == 0:
            m = evaluate_stitches(net, val_loader, panel, device, amp_dtype, args.log_interval)
            eval_metrics = {"loss": sum(v["loss"] for v in m.values()) / len(m),
                            "top1": sum(v["acc1"] for v in m.values()) / len(m),
                            "top5": sum(v["acc5"] for v in m.values()) / len(m)}
            eval_metrics.update({f"top1@{c}": v["acc1"] for c, v in m.items()})
            metric = eval_metrics.get(args.eval_metric, eval_metrics["top1"])
            _logger.info(f"epoch {epoch}: train loss {train_loss:.4f}; panel {panel} mean top-1 "
                         f"{eval_metrics['top1']:.3f} loss {eval_metrics['loss']:.4f}")
        else:
            metric = train_loss if "loss" in args.eval_metric else None
        lr_scheduler.step(epoch + 1, metric)
        if primary:
            lrs = [g["lr"] for g in optimizer.param_groups]
            update_summary(epoch, {"loss": train_loss}, eval_metrics, filename=str(out_dir / "summary.csv"),
                           lr=sum(lrs) / len(lrs), write_header=None)
            state = {"epoch": epoch, "global_step": global_step, "arch": "+".join(model.names),
                     "state_dict": model_state(model), "optimizer": optimizer.state_dict(),
                     "args": json.dumps(vars(args), default=str), "config": config_text}
            if loss_scaler is not None:
                state["amp_scaler"] = loss_scaler.state_dict()
            improved = keeper.save(state, metric)
            _logger.info(f"saved {out_dir / LAST}" + (" (best so far)" if improved else ""))
    if val_ds is not None:
        ckpt_hash = file_sha256(out_dir / LAST) if primary else ""
        evaluate_all(net, val_ds, args, data_cfg, device, amp_dtype, out_dir, ckpt_hash, config_text)


def _truncate_summary(path: Path, start_epoch: int) -> None:
    """A resumed run redoes epochs >= start_epoch: drop their rows (written before the kill) from summary.csv."""
    if not path.exists():
        return
    from .fileio import write_text_atomic
    lines = path.read_text().splitlines(keepends=True)
    keep = lines[:1] + [l for l in lines[1:] if l.split(",", 1)[0].isdigit() and int(l.split(",", 1)[0]) < start_epoch]
    write_text_atomic(path, "".join(keep))


def build_teacher(args: argparse.Namespace, device: torch.device) -> nn.Module:
    from .build import create_anchor
    from .config import AnchorSpec
    teacher = create_anchor(AnchorSpec(args.teacher, args.teacher_checkpoint or None),
                            pretrained=not args.teacher_checkpoint, num_classes=args.num_classes)
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad = False
    return teacher


if __name__ == "__main__":
    sys.exit(main())
