"""The data layer's options as typed objects: which images (`DataOptions`) and how they are loaded
(`LoaderOptions`). Each field declares its train.py flag (`snnet.utils.options.option`: timm's name, help, rule),
so train.py's parser is derived from these classes and builds them from its resolved arguments, once
(`snnet.train.options.RunOptions.from_values`); every other tool (similarity, search, stitch-train, a Python
caller) builds them directly, by keyword. The options the training loop shares (batch size, seed, ...) are
declared here, once, except those a stitch config sets (batch size, number of classes, dataset, workers): they are
declared in `snnet.stitching.config.ConfigFlags`, below this layer, so the config reads their type and rule too."""
from __future__ import annotations

from dataclasses import MISSING, dataclass, replace
from typing import Any

from snnet.stitching.config import CONFIG_FLAGS
from snnet.utils.options import AUGMENT, DATASET, DEVICE, MODEL, OUTPUT, option, shared

__all__ = ["AUG_REPEATS", "BATCH_SIZE", "CLASS_FOLDERS", "DATA_ROOT", "DataOptions", "GRAD_ACCUM_STEPS",
           "LoaderOptions", "NO_PREFETCHER", "NUM_CLASSES", "SEED"]

#: what to give for a data folder that is not one: a folder dataset's root (train.py, shards, similarity), and the
#: folders quickstart also takes
DATA_ROOT = "the dataset root (with train/ and val/)"
CLASS_FOLDERS = "a folder of images, one sub-folder per class (or train/ and val/ with one sub-folder per class each)"
#: options the data layer shares with the training loop (`snnet.train.options` uses them `shared`)
BATCH_SIZE = CONFIG_FLAGS["batch_size"]  # a stitch config sets these two: declared in snnet.stitching.config
GRAD_ACCUM_STEPS = option(1, "--grad-accum-steps", rule="positive", metavar="N", group=MODEL,
                          help="batches per optimizer step: the loss is divided by N, all N train the step's stitch, "
                               "DDP syncs gradients on the last; steps per epoch = batches // N (the remainder "
                               "batches of each epoch are dropped); the LR rule's global batch is -b x processes x N")
NUM_CLASSES = CONFIG_FLAGS["num_classes"]
SEED = option(42, "--seed", rule="non_negative", group=OUTPUT,
              help="random seed (numpy and torch seed with unsigned integers)")
AUG_REPEATS = option(0, "--aug-repeats", rule="count", group=AUGMENT,
                     help="Repeated augmentation: each training image drawn N times per epoch across the processes, "
                          "each copy augmented on its own (distributed training; DeiT uses 3). 0 (default): off; "
                          "1: the same sampler with one copy, i.e. each image once")
NO_PREFETCHER = option(False, "--no-prefetcher", group=DEVICE, help="disable fast prefetcher")


@dataclass(frozen=True)
class DataOptions:
    """Which images: the dataset, its folder and splits, and what the checks compare them with (classes, the
    optimizer steps an epoch gives)."""
    data_dir: str = option(MISSING, "--data-dir", metavar="DIR", group=DATASET,
                           help="path to dataset (root dir); wins over the positional DIR")
    # '' = an ImageFolder root; wds/NAME = shards; torch/, hfds/, hfids/ = timm's
    dataset: str = shared(CONFIG_FLAGS["dataset"])
    train_split: str = option("train", "--train-split", group=DATASET, help="dataset train split")
    val_split: str = option("validation", "--val-split", group=DATASET,
                            help="dataset validation split; falls back to val/ when validation/ is absent")
    class_map: str = option("", "--class-map", group=DATASET, help="path to class to idx mapping file")
    dataset_download: bool = option(False, "--dataset-download", group=DATASET,
                                    help="Allow download of dataset for torch/ and tfds/ datasets that support it.")
    num_classes: int | None = shared(NUM_CLASSES)  # None: the data's own count
    seed: int = shared(SEED)
    # what one training epoch draws (the steps check of `check_data`; timm's iterable datasets batch by it)
    batch_size: int = shared(BATCH_SIZE)
    grad_accum_steps: int = shared(GRAD_ACCUM_STEPS)
    aug_repeats: float = shared(AUG_REPEATS)


@dataclass(frozen=True)
class LoaderOptions:
    """How images are loaded: batch sizes, workers, and timm's training augmentation (its `create_loader` keywords
    under train.py's flag names)."""
    batch_size: int = shared(BATCH_SIZE)
    validation_batch_size: int | None = option(None, "-vb", "--validation-batch-size", rule="positive", group=MODEL,
                                               help="Validation batch size override (default: --batch-size)")
    workers: int = shared(CONFIG_FLAGS["workers"])
    pin_mem: bool = option(False, "--pin-mem", group=DEVICE,
                           help="Pin CPU memory in DataLoader for more efficient (sometimes) transfer to GPU.")
    distributed: bool = False           # training: this rank's share of each epoch (the process group's, no flag)
    no_prefetcher: bool = shared(NO_PREFETCHER)
    # training augmentation (timm's create_loader)
    no_aug: bool = option(False, "--no-aug", group=AUGMENT,
                          help="Disable all training augmentation, override other train aug args")
    scale: tuple[float, float] = option((0.08, 1.0), "--scale", nargs=2, group=AUGMENT, help="Random resize scale")
    ratio: tuple[float, float] = option((3.0 / 4.0, 4.0 / 3.0), "--ratio", nargs=2, group=AUGMENT,
                                        help="Random resize aspect ratio")
    hflip: float = option(0.5, "--hflip", rule="probability", group=AUGMENT,
                          help="Horizontal flip training aug probability")
    vflip: float = option(0.0, "--vflip", rule="probability", group=AUGMENT,
                          help="Vertical flip training aug probability")
    # a float or (brightness, contrast, saturation[, hue])
    color_jitter: Any = option(0.4, "--color-jitter", kind="float", group=AUGMENT, help="Color jitter factor")
    aa: str | None = option(None, "--aa", group=AUGMENT,
                            help="Use AutoAugment policy, e.g. rand-m9-mstd0.5-inc1 (default: none)")
    train_interpolation: str = option("random", "--train-interpolation", rule="train_interpolation",
                                      group=AUGMENT, help="Training interpolation (random, bilinear, bicubic)")
    # rrc, rkrc, rkrr (timm's) or src (DeiT-III's, `transforms.src_crop`)
    train_crop_mode: str = option("rrc", "--train-crop-mode", choices=("rrc", "rkrc", "rkrr", "src"), group=AUGMENT,
                                  help="Training crop: rrc (timm's random-resized crop, --scale/--ratio), rkrc/rkrr "
                                       "(timm's keep-ratio variants) or src (DeiT-III's 3-Augment crop as SN-Netv2 "
                                       "trains: resize the short side to the image size, random crop with 4 px "
                                       "reflect padding) (default: rrc)")
    reprob: float = option(0.0, "--reprob", rule="probability", group=AUGMENT, help="Random erase prob")
    remode: str = option("pixel", "--remode", choices=("const", "rand", "pixel"), group=AUGMENT,
                         help="Random erase mode")
    recount: int = option(1, "--recount", rule="positive", group=AUGMENT, help="Random erase count")
    resplit: bool = option(False, "--resplit", group=AUGMENT,
                           help="Do not random erase first (clean) augmentation split")
    aug_repeats: float = shared(AUG_REPEATS)
    aug_splits: int = option(0, "--aug-splits", rule="non_negative", group=AUGMENT,
                             help="Number of augmentation splits (valid: 0 or >=2)")

    def with_batch_size(self, batch_size: int) -> LoaderOptions:
        """The same options with another training batch size (the LS init's augmented batch)."""
        return replace(self, batch_size=batch_size)
