"""check_data: data that would give silently wrong numbers or fail late is one
DataError line naming the value, found by a scan of the folders (no image opened). Plus the true count of the LS-init
images and the name of a skipped (truncated) training image."""
import argparse
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from snnet.data.checks import DataError, check_data, scan_image_folder
from snnet.data.loaders import create_train_loader
from snnet.data.ls_images import clean_images


def make_split(root, split, classes, per_class=3, ext=".png", start=0):
    from sklearn.datasets import load_digits
    images = load_digits().images
    n = start
    for c in classes:
        folder = root / split / str(c)
        folder.mkdir(parents=True, exist_ok=True)
        for _ in range(per_class):
            img = Image.fromarray((images[n % len(images)] / 16 * 255).astype(np.uint8)).convert("RGB")
            img.save(folder / f"{n}{ext}")
            n += 1
    return root / split


def data_args(root, **kw):
    base = dict(data_dir=str(root), dataset="", train_split="train", val_split="validation", class_map="",
                batch_size=4, num_classes=None, grad_accum_steps=1, eval=False, aug_repeats=0,
                dataset_download=False)
    return argparse.Namespace(**{**base, **kw})


@pytest.fixture
def good(tmp_path):
    make_split(tmp_path, "train", range(5), per_class=6)
    make_split(tmp_path, "val", range(5), per_class=2)
    return tmp_path


def test_good_folder_passes(good):
    check_data(data_args(good), need_train=True, world_size=1)
    check_data(data_args(good, eval=True), need_train=False, world_size=4)


def test_layout_checks_are_resolve_folders(tmp_path):
    with pytest.raises(DataError, match=f"data folder '{tmp_path}/nope' does not exist"):
        check_data(data_args(tmp_path / "nope"), need_train=True, world_size=1)
    (tmp_path / "train" / "0").mkdir(parents=True)
    with pytest.raises(DataError, match="has class folders but no images"):
        check_data(data_args(tmp_path), need_train=True, world_size=1)


def test_split_folders_in_another_case_are_the_splits(tmp_path):
    """Train/ and VAL/ are read as train/ and val/ (the exact name first where both are there)."""
    from snnet.data.checks import resolve_folders
    make_split(tmp_path, "Train", range(2))
    make_split(tmp_path, "VAL", range(2), per_class=1)
    assert resolve_folders(data_args(tmp_path), need_train=True) == (str(tmp_path / "Train"), str(tmp_path / "VAL"))
    make_split(tmp_path, "train", range(2))
    assert resolve_folders(data_args(tmp_path), need_train=True)[0] == str(tmp_path / "train")


def test_val_with_other_classes_names_them(good):
    make_split(good, "val", ["9"], per_class=1, start=500)
    for f in (good / "val" / "4").iterdir():
        f.unlink()
    (good / "val" / "4").rmdir()
    with pytest.raises(DataError) as e:
        check_data(data_args(good), need_train=True, world_size=1)
    msg = str(e.value)
    assert "only in train/: '4'" in msg and "only in val/: '9'" in msg and "--class-map" in msg, msg
    assert "\n" not in msg


def test_class_folder_without_images_counts_as_missing(good):
    """timm labels only folders holding images: an empty val/4 still shifts the labels."""
    for f in (good / "val" / "4").iterdir():
        f.unlink()
    with pytest.raises(DataError, match="only in train/: '4'"):
        check_data(data_args(good), need_train=True, world_size=1)


def test_class_map_fixes_the_numbering(good):
    (good / "classes.txt").write_text("".join(f"{c}\n" for c in range(5)))
    for f in (good / "val" / "4").iterdir():
        f.unlink()
    check_data(data_args(good, class_map=str(good / "classes.txt")), need_train=True, world_size=1)
    with pytest.raises(DataError, match="--class-map '.*nope.txt' cannot be read"):
        check_data(data_args(good, class_map=str(good / "nope.txt")), need_train=True, world_size=1)


def test_symlink_loop_names_the_link(good):
    link = good / "train" / "3" / "again"
    os.symlink(good / "train", link)
    with pytest.raises(DataError) as e:
        check_data(data_args(good), need_train=True, world_size=1)
    assert f"the symlink '{link}' loops back to" in str(e.value) and "remove the link" in str(e.value)


def test_folder_linked_twice_names_the_link(good):
    link = good / "train" / "5"
    os.symlink(good / "train" / "4", link)
    with pytest.raises(DataError) as e:
        check_data(data_args(good), need_train=True, world_size=1)
    assert f"remove the link '{link}'" in str(e.value) and "read its images twice" in str(e.value)


def test_batch_larger_than_the_split(tmp_path):
    make_split(tmp_path, "train", range(3), per_class=10)  # 30 images
    make_split(tmp_path, "val", range(3), per_class=1)
    with pytest.raises(DataError) as e:
        check_data(data_args(tmp_path, batch_size=256), need_train=True, world_size=1)
    msg = str(e.value)
    assert "-b/--batch-size 256 gives no optimizer step" in msg and "has 30 training images" in msg, msg
    assert "lower -b to at most 30" in msg
    check_data(data_args(tmp_path, batch_size=30), need_train=True, world_size=1)
    with pytest.raises(DataError, match="30 training images \\(15 per process over 2 processes\\).*at most 15"):
        check_data(data_args(tmp_path, batch_size=16), need_train=True, world_size=2)
    with pytest.raises(DataError, match="--grad-accum-steps 4 exceeds the 3 training batch\\(es\\) per process"):
        check_data(data_args(tmp_path, batch_size=8, grad_accum_steps=4), need_train=True, world_size=1)
    with pytest.raises(DataError, match="-b/--batch-size 32 and --grad-accum-steps 4 .* at most 7"):
        check_data(data_args(tmp_path, batch_size=32, grad_accum_steps=4), need_train=True, world_size=1)
    check_data(data_args(tmp_path, batch_size=256, eval=True), need_train=False, world_size=1)  # no training


def test_num_classes_smaller_than_the_data(good):
    with pytest.raises(DataError) as e:
        check_data(data_args(good, num_classes=3), need_train=True, world_size=1)
    assert "--num-classes 3 is smaller than the 5 classes" in str(e.value)
    check_data(data_args(good, num_classes=5), need_train=True, world_size=1)
    check_data(data_args(good, num_classes=1000), need_train=True, world_size=1)


def test_images_counted_as_timm_reads_them(tmp_path):
    from timm.data import create_dataset
    train = make_split(tmp_path, "train", range(3), per_class=4)
    make_split(tmp_path, "train", ["0"], per_class=2, ext=".bmp", start=100)  # timm does not read .bmp
    (train / "1" / "notes.txt").write_text("not an image")
    Image.new("RGB", (8, 8)).save(train / "2" / "upper.PNG")
    nested = train / "2" / "extra"
    nested.mkdir()
    Image.new("RGB", (8, 8)).save(nested / "x.jpeg")  # timm labels it 'extra'
    counts = scan_image_folder(str(train))
    ds = create_dataset("", root=str(train), split="", search_split=False, is_training=True)
    assert sum(counts.values()) == len(ds) == 14
    assert set(counts) == set(ds.reader.class_to_idx) == {"0", "1", "2", "extra"}
    only_bmp = tmp_path / "bmp"
    make_split(only_bmp, "train", range(2), per_class=2, ext=".bmp")
    with pytest.raises(DataError, match="has class folders but no images"):
        check_data(data_args(only_bmp), need_train=True, world_size=1)


def test_the_extensions_and_order_read_without_timm_are_timms():
    """The checks read timm's image extensions from its source and sort class names as its folder reader does, so
    that a folder is checked before timm (and torch) is imported: both agree with timm itself."""
    from timm.data.readers import get_img_extensions
    from timm.utils.misc import natural_key

    from snnet.data.checks import _natural_order, _timm_start_extensions
    assert _timm_start_extensions() == get_img_extensions()
    names = ["a10", "A2", "b", "Z9x1", "x01", "x1", "10", "9", "Bee 3", "bee 12", "café"]
    assert sorted(names, key=_natural_order) == sorted(names, key=natural_key)


def test_clean_images_reports_the_true_count(tmp_path):
    from timm.data import create_dataset
    train = make_split(tmp_path, "train", range(3), per_class=10)
    ds = create_dataset("", root=str(train), split="", search_split=False)
    cfg = dict(input_size=(3, 16, 16), interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0)
    images = clean_images(ds, cfg, 256, seed=0)
    assert (images.count, images.requested, images.local_count) == (30, 256, 30)
    assert sum(len(b) for b in images) == 30
    share = clean_images(ds, cfg, 256, seed=0, rank=1, world_size=4)
    assert share.count == 30 and share.local_count == 8 == sum(len(b) for b in share)
    assert clean_images(ds, cfg, 8, seed=0).count == 8


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_truncated_training_image_is_named(tmp_path, caplog, ext):
    from timm.data import create_dataset

    from snnet.train.args import parse_args
    train = make_split(tmp_path, "train", range(2), per_class=4, ext=ext)
    victim = sorted(train.rglob(f"*{ext}"))[2]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    args, _ = parse_args([str(tmp_path), "--model", "resnet18", "--no-pretrained", "-j", "0", "-b", "8",
                          "--no-prefetcher"])
    args.distributed = False
    ds = create_dataset("", root=str(train), split="", search_split=False, is_training=True)
    cfg = dict(input_size=(3, 16, 16), interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0)
    loader = create_train_loader(ds, args, cfg, torch.device("cpu"))
    with caplog.at_level(logging.WARNING):
        batches = list(loader)
    assert sum(len(b[0]) for b in batches) == 8  # the same count as timm: the next image in its place
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert lines == [lines[0]] and f"skipped training image '{victim}'" in lines[0], lines
    assert ds._max_retries > 1 and ds.transform is None  # the caller's dataset is untouched


def test_image_over_pils_decompression_bomb_limit_named(good, monkeypatch):
    """An image above PIL's pixel limit (lowered here so that a 32x32 image is one) is named before any work, with
    the limit and the fix, instead of failing in timm's loader mid-run."""
    big = good / "val" / "3" / "big.png"
    Image.new("RGB", (32, 32)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)  # 1024 pixels > 2 x 400: PIL refuses to open it
    with pytest.raises(DataError, match=r"validation image .*big.png' is too large for PIL \(Image size \(1024 "
                                        r"pixels\) exceeds limit of 800 pixels.*; downscale it"):
        check_data(data_args(good), need_train=True, world_size=1)


def test_a_validation_split_that_fails_to_load_is_an_error_naming_it(monkeypatch, caplog):
    """timm's non-folder datasets: a validation split that cannot be loaded was dropped silently (the run then chose
    model_best by training loss); it is an error naming the split, and --val-split '' is the explicit choice."""
    import logging

    from snnet.data import datasets
    from snnet.data.checks import DataError
    from snnet.data.options import DataOptions

    def fake(name, split, is_training, **kw):
        if not is_training:
            raise ValueError(f"Unknown split '{split}'")
        return [0, 1, 2]
    monkeypatch.setattr(datasets, "create_dataset", fake)
    args = DataOptions("/data/somewhere", dataset="torch/cifar10", val_split="valid")
    with pytest.raises(DataError, match="validation split 'valid' of --dataset 'torch/cifar10'") as e:
        datasets.create_datasets(args, need_train=True)
    assert "Unknown split 'valid'" in str(e.value) and "--val-split ''" in str(e.value)
    with caplog.at_level(logging.INFO, logger="snnet"):
        train, val = datasets.create_datasets(DataOptions("/data/somewhere", dataset="torch/cifar10", val_split=""),
                                              need_train=True)
    assert train == [0, 1, 2] and val is None and "no validation split" in caplog.text
