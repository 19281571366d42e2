"""The data layer's options as typed objects: which images (`DataOptions`) and how they are loaded
(`LoaderOptions`). Field names and defaults are train.py's flags' (`tests/test_options.py` holds them equal to the
parser's), so train.py builds them from its resolved arguments (`snnet.train.args.options_from`) and every other
tool (similarity, search, stitch-train, a Python caller) builds them directly, by keyword."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class DataOptions:
    """Which images: the dataset, its folder and splits, and what the checks compare them with (classes, the
    optimizer steps an epoch gives)."""
    data_dir: str
    dataset: str = ""                   # '' = an ImageFolder root; wds/NAME = shards; torch/, hfds/, hfids/ = timm's
    train_split: str = "train"
    val_split: str = "validation"
    class_map: str = ""
    dataset_download: bool = False
    num_classes: int | None = None      # None: the data's own count
    seed: int = 42
    # what one training epoch draws (the steps check of `check_data`; timm's iterable datasets batch by it)
    batch_size: int = 128
    grad_accum_steps: int = 1
    aug_repeats: float = 0


@dataclass(frozen=True)
class LoaderOptions:
    """How images are loaded: batch sizes, workers, and timm's training augmentation (its `create_loader` keywords
    under train.py's flag names)."""
    batch_size: int = 128
    validation_batch_size: int | None = None  # None: batch_size
    workers: int = 4
    pin_mem: bool = False
    distributed: bool = False           # training: this rank's share of each epoch
    no_prefetcher: bool = False
    # training augmentation (timm's create_loader)
    no_aug: bool = False
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    hflip: float = 0.5
    vflip: float = 0.0
    color_jitter: Any = 0.4            # a float or (brightness, contrast, saturation[, hue])
    aa: str | None = None
    train_interpolation: str = "random"
    train_crop_mode: str = "rrc"        # rrc, rkrc, rkrr (timm's) or src (DeiT-III's, `transforms.src_crop`)
    reprob: float = 0.0
    remode: str = "pixel"
    recount: int = 1
    resplit: bool = False
    aug_repeats: float = 0
    aug_splits: int = 0

    def with_batch_size(self, batch_size: int) -> LoaderOptions:
        """The same options with another training batch size (the LS init's augmented batch)."""
        return replace(self, batch_size=batch_size)

