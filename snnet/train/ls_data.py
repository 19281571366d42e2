"""The least-squares init of a run's stitching layers and the images it fits on: clean images of the training split
(`snnet.data.ls_images.clean_images`), or for ``--ls-mode snnet`` SN-Net's augmented training batch
(docs/snnet_compat.md, C12; SN-Netv2's fit, C36). The fit itself is `snnet.stitching.ls_init.ls_init`."""
from __future__ import annotations

import logging
import time
from typing import Any

import torch

from snnet.data.checks import DataError
from snnet.data.datasets import create_datasets
from snnet.data.loaders import create_train_loader
from snnet.data.ls_images import clean_images
from snnet.stitching.config import StitchConfig
from snnet.stitching.ls_init import ls_init
from snnet.stitching.model import RoutedNet
from snnet.train.losses import create_mixup
from snnet.train.options import RunOptions
from snnet.utils.distributed import world
from snnet.utils.errors import one_line

_logger = logging.getLogger("snnet")


def snnet_init_batch(images_from: Any, count: int, options: RunOptions, data_cfg: dict[str, Any]) -> torch.Tensor:
    """SN-Net's LS-init data (docs/snnet_compat.md, C12): this process's first batch of `count` images of a training
    loader built like training's (full augmentation, `data_cfg`), mixed up when mixup/cutmix are on."""
    train_ds, reason = images_from, ""
    if options.job.eval:  # evaluation runs do not load the training split
        try:
            train_ds = create_datasets(options.data, need_train=True)[0]
        except DataError as e:
            train_ds, reason = None, f" ({one_line(e)})"
    if train_ds is None:
        raise DataError(f"--ls-mode snnet fits on a training batch, as SN-Net did, and needs the training split"
                        f"{reason}; add it, or use --ls-mode joint")
    mixup_fn = create_mixup(options.loss)
    if mixup_fn is not None and count % 2:
        raise DataError(f"--ls-mode snnet with mixup/cutmix needs an even init batch, got stitch_init_bs {count}")
    loader = create_train_loader(train_ds, options.loader.with_batch_size(count), data_cfg, options.device)
    batch = next(iter(loader), None)
    if batch is None:  # the training loader drops incomplete batches
        raise DataError(f"--ls-mode snnet needs {count} training images per process (stitch_init_bs) for its batch; "
                        f"lower --stitch-init-bs, or use --ls-mode joint")
    images, targets = batch[0].to(options.device), batch[1].to(options.device)
    return mixup_fn(images, targets)[0] if mixup_fn is not None else images


def snnet_version(stitch_cfg: StitchConfig | None) -> int:
    """Whose init ``--ls-mode snnet`` reproduces: SN-Netv2's for its two-way plan, else SN-Net's."""
    return 2 if stitch_cfg is not None and stitch_cfg.get("stitch_plan") == "two_way" else 1


def run_ls_init(net: RoutedNet, images_from: Any, stitch_cfg: StitchConfig, options: RunOptions,
                data_cfg: dict[str, Any]) -> None:
    """Least-squares init of the stitching layers (`snnet.stitching.ls_init.ls_init`) on --stitch-init-bs clean
    images of `images_from` (preprocessed by timm's data config `data_cfg`, drawn by the run's seed), or for
    ``--ls-mode snnet`` on SN-Net's training batch, with a log line. The count and the mode default to the stitch
    config's."""
    count = options.job.stitch_init_bs or stitch_cfg.get("stitch_init_bs")
    mode = options.job.ls_mode or stitch_cfg.get("ls_mode")
    rank, world_size = world()
    t0 = time.perf_counter()
    if mode == "snnet":
        images: Any = [snnet_init_batch(images_from, count, options, data_cfg)]
        what = f"{count} augmented training images per process"
    else:
        images = clean_images(images_from, data_cfg, count, options.train.seed, rank, world_size)
        what = f"{images.count} clean images" + (f" ({count} asked)" if images.count < count else "")
    if mode == "snnet" and snnet_version(stitch_cfg) == 2:  # SN-Netv2's fit: eval mode, under the run's autocast
        reports = ls_init(net, images, mode=mode, snnet_version=2, amp_dtype=options.amp_dtype)
        what += f", SN-Netv2's fit (eval mode, autocast {options.amp_dtype})"
    else:
        reports = ls_init(net, images, mode=mode)
    if reports:
        errs = [r.rel_error for r in reports]
        _logger.info(f"LS init: {len(reports)} stitching layers fitted on {what} ({mode}) in "
                     f"{time.perf_counter() - t0:.1f}s; relative fit error mean {sum(errs) / len(errs):.4f} "
                     f"max {max(errs):.4f}")
