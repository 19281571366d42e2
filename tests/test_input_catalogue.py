"""The bad-input catalogue: each case ends with exit code 2, a one-line message naming the problem and the
fix, no traceback, and no file written or overwritten. Each case runs train.py as a user does: a fresh process with
its real stderr (helpers.ForkedCli), so a log line printed before a late error fails the "one line" check; a hostile
pickle must run nothing."""
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from helpers import FAST, TINY, ForkedCli

PWNED = Path("/tmp/snnet_pwned_marker")


class Exploit:
    """Unpickling this runs a shell command: a planted checkpoint."""

    def __reduce__(self):
        return (os.system, (f"touch {PWNED}",))


@pytest.fixture(scope="module")
def world(tmp_path_factory, digits_folder, tiny_config):
    w = tmp_path_factory.mktemp("bad")
    (w / "empty").mkdir()
    (w / "only_val" / "val" / "0").mkdir(parents=True)
    (w / "flat" / "train").mkdir(parents=True)
    (w / "flat" / "train" / "a.png").write_bytes(b"x")
    (w / "noimg" / "train" / "0").mkdir(parents=True)
    (w / "noimg" / "train" / "0" / "notes.txt").write_text("no images here")
    (w / "afile").write_text("not a folder")
    corrupt = w / "corrupt"
    import shutil
    shutil.copytree(digits_folder, corrupt)
    victim = sorted((corrupt / "val").rglob("*.png"))[3]
    victim.write_bytes(b"\x89PNG truncated")
    (w / "victim").write_text(str(victim))
    shutil.copytree(digits_folder, w / "otherval")  # val/ names class 9 differently: labels would shift
    (w / "otherval" / "val" / "9").rename(w / "otherval" / "val" / "nine")
    shutil.copytree(digits_folder, w / "loop")  # a symlink loop: timm's reader would read train/ over and over
    os.symlink(w / "loop" / "train", w / "loop" / "train" / "3" / "again")
    (w / "garbage.pth").write_bytes(os.urandom(300))
    (w / "empty.pth").write_bytes(b"")
    (w / "list.pth").write_bytes(b"")
    torch.save([1, 2, 3], w / "list.pth")
    (w / "weights.json").write_text("{}")
    other = json.loads(tiny_config.read_text())
    other["anchors"][1]["model_kwargs"]["embed_dim"] = 24
    (w / "other.json").write_text(json.dumps(other))
    from snnet import build_snnet, load_stitch_config
    net = build_snnet(load_stitch_config(w / "other.json"), pretrained=False, img_size=16, num_classes=10)
    torch.save({"state_dict": net.state_dict(), "epoch": 0}, w / "other_config.pth.tar")
    with open(w / "evil.pth", "wb") as f:
        pickle.dump({"state_dict": {}, "args": Exploit()}, f)
    torch.save({"model": {}, "args": Exploit()}, w / "evil_torch.pth")
    (w / "bad.json").write_text('{"anchors": ["deit_tiny_patch16_224"], "lr": }')
    (w / "trunc.json").write_text(tiny_config.read_text()[:40])
    (w / "list.json").write_text('["deit_tiny_patch16_224"]')
    (w / "unknown.json").write_text(json.dumps({"anchors": TINY, "stitch_kernal_size": 2}))
    (w / "type.json").write_text(json.dumps({"anchors": TINY, "stitch_stride": "1"}))
    (w / "unknown_model.json").write_text(json.dumps({"anchors": ["deit_tiny_patch16_224", "deit_smal_patch16_224"]}))
    (w / "order.json").write_text(json.dumps({"anchors": TINY[::-1]}))
    deep = [dict(TINY[0]), dict(TINY[1], model_kwargs=dict(TINY[1]["model_kwargs"], depth=6))]
    (w / "depth.json").write_text(json.dumps({"anchors": deep}))
    (w / "missing_anchor.json").write_text(json.dumps({"anchors": [dict(TINY[0], checkpoint=str(w / "no.pth"))]}))
    (w / "wrong_anchor.json").write_text(
        json.dumps({"anchors": [dict(TINY[1], checkpoint=str(w / "other_config.pth.tar"))]}))
    (w / "bad.yaml").write_text("epochs: [1, 2\n")
    (w / "keys.yaml").write_text("epoch: 3\n")
    (w / "list.yaml").write_text("- 1\n- 2\n")
    (w / "zero_batch.yaml").write_text("batch_size: 0\n")
    (w / "scalar_mean.yaml").write_text("mean: 0.5\n")
    (w / "nan_lr.json").write_text('{"anchors": %s, "lr": NaN}' % json.dumps(TINY))
    (w / "dup.json").write_text('{"anchors": %s, "epochs": 3, "epochs": 5}' % json.dumps(TINY))
    (w / "dup.yaml").write_text("epochs: 3\nepochs: 4\n")
    (w / "nan.yaml").write_text("lr: .nan\n")
    (w / "bad_reprob.json").write_text(json.dumps({"anchors": TINY, "recipe": {"reprob": 2}}))
    import numpy as np
    from PIL import Image
    shutil.copytree(digits_folder, w / "hidden")  # a Jupyter checkpoint folder with an image: timm makes it a class
    (w / "hidden" / "train" / ".ipynb_checkpoints").mkdir()
    shutil.copy(sorted((w / "hidden" / "train" / "0").glob("*.png"))[0], w / "hidden" / "train" / ".ipynb_checkpoints")
    shutil.copytree(digits_folder, w / "wide")  # a 16-bit PNG: timm's RGB conversion clips it to white
    wide = sorted((w / "wide" / "val" / "4").glob("*.png"))[0]
    Image.fromarray(np.full((16, 16), 4000, dtype=np.uint16)).save(wide)
    (w / "wide_name").write_text(str(wide))
    shutil.copytree(digits_folder, w / "mac", copy_function=os.link)  # macOS's AppleDouble file: a ._ "image"
    (w / "mac" / "val" / "3" / "._scan.png").write_bytes(b"\x00\x05\x16\x07" + bytes(80))
    (w / "rso.json").write_text(json.dumps({"anchors": TINY, "sampler": {"type": "rso"}}))
    (w / "wide_gap.json").write_text(json.dumps({"anchors": TINY, "sampler": {"type": "ros", "gap": 1000}}))
    (w / "nine.txt").write_text("\n".join(str(c) for c in range(9)) + "\n")  # leaves class 9 out
    (w / "per_pair.json").write_text(json.dumps({"anchors": TINY, "positions": {"select": "cka", "per_pair": 99}}))
    coarse = [TINY[0], dict(TINY[1], model_kwargs=dict(TINY[1]["model_kwargs"], patch_size=8))]
    (w / "coarse.json").write_text(json.dumps({"anchors": coarse}))  # 16 tokens vs 4: no stitch joins them
    (w / "exclude.json").write_text(json.dumps({"anchors": TINY, "train_exclude": [40]}))
    _hf_datasets(w / "hf", digits_folder)
    # the residue of the outside catalogues
    for name, gap in (("gap0", 0), ("gap_neg", -1), ("gap_huge", 1e9), ("gap_str", "wide")):
        (w / f"ros_{name}.json").write_text(json.dumps({"anchors": TINY, "sampler": {"type": "ros", "gap": gap}}))
    (w / "vit_stages.json").write_text(json.dumps({"anchors": TINY, "stitch_stages": [1, 2]}))
    (w / "one_anchor.json").write_text(json.dumps({"anchors": TINY[:1]}))
    (w / "twelve.json").write_text(json.dumps({"anchors": TINY, "num_classes": 12}))
    (w / "five.json").write_text(json.dumps({"anchors": TINY, "num_classes": 5}))
    (w / "twice.txt").write_text("\n".join(["0", "1", "2", "3", "3", "4", "5", "6", "7", "8", "9"]) + "\n")
    tiny = load_stitch_config(tiny_config)
    ten = build_snnet(tiny, pretrained=False, img_size=16, num_classes=10)
    torch.save({"state_dict": ten.state_dict(), "epoch": 0, "args": json.dumps({"num_classes": 10})},
               w / "ten_classes.pth.tar")
    torch.save({"state_dict": ten.state_dict(), "epoch": 0, "optimizer": {"state": {}, "param_groups": []},
                "args": json.dumps({"num_classes": 10, "opt": "sgd"})}, w / "sgd_state.pth.tar")
    named = [*map(str, range(9)), "nine"]  # trained on another folder: its last class named otherwise
    torch.save({"state_dict": ten.state_dict(), "epoch": 0,
                "args": json.dumps({"num_classes": 10, "class_names": named})}, w / "other_names.pth.tar")
    # checkpoints that fit another network than the run's (refused by the checks, before any work)
    (w / "ckpt_folder").mkdir()
    (w / "folder_anchor.json").write_text(
        json.dumps({"anchors": [dict(TINY[0], checkpoint=str(w / "ckpt_folder")), TINY[1]]}))
    big = build_snnet(tiny, pretrained=False, img_size=32, num_classes=10)
    torch.save({"state_dict": big.state_dict(), "epoch": 0}, w / "img32.pth.tar")
    from snnet.stitching.build import create_anchor
    from snnet.stitching.config import AnchorSpec
    plain = create_anchor(AnchorSpec(TINY[0]["name"], None, TINY[0]["model_kwargs"]), pretrained=False,
                          num_classes=10, img_size=16)
    torch.save({"state_dict": plain.state_dict(), "epoch": 0,
                "config": json.dumps({"stitch_config": None, "anchors": [TINY[0]["name"]]})}, w / "plain.pth.tar")
    for split in ("train", "val"):  # an image over PIL's decompression-bomb limit, last of its class folder
        shutil.copytree(digits_folder, w / f"bomb_{split}")
        (w / f"bomb_{split}" / split / "3" / "zz.png").write_bytes(bomb_png())
    return w


def bomb_png(width=14000, height=14000):
    """A PNG header of a 196-Mpx image (no pixel data: PIL refuses it at open, by its size)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IEND", b"")


def _hf_datasets(root, digits_folder):
    """Local Hugging Face datasets (parquet in the Hub's layout, data/<split>-00000-of-00001.parquet) as users
    bring them: good ones, and each kind of bad one."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    names = [str(c) for c in range(10)]
    hf_meta = {b"huggingface": json.dumps({"info": {"features": {
        "image": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": names}}}}).encode()}

    def write(name, split, *, meta=hf_meta, rename=None, bad_row=None):
        files = sorted((digits_folder / ("train" if split == "train" else "val")).rglob("*.png"))
        images = [{"bytes": f.read_bytes(), "path": f.name} for f in files]
        if bad_row is not None:
            images[bad_row] = {"bytes": b"", "path": "empty.png"}
        table = pa.table({"image": pa.array(images), "label": pa.array([int(f.parent.name) for f in files],
                                                                       pa.int64())})
        if rename:
            table = table.rename_columns([rename.get(c, c) for c in table.column_names])
        if meta:
            table = table.replace_schema_metadata(meta)
        path = root / name / "data" / f"{split}-00000-of-00001.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        return path

    for split in ("train", "validation"):
        write("plain", split, meta=None)  # integer labels without class names: no class count
        write("named", split)  # as `datasets` writes them: ClassLabel names in the schema's metadata
        write("nolabel", split, rename={"label": "target"})
        write("badimage", split, bad_row=3 if split == "validation" else None)
        cut = write("cut", split)
        if split == "validation":
            cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
        junk = write("junk", split)
        if split == "train":
            junk.write_bytes(os.urandom(2000))
        path = write("strlabel", split)
        t = pq.read_table(path)
        pq.write_table(t.set_column(1, "label", pa.array([f"class {v}" for v in t.column("label").to_pylist()])),
                       path)


CASES = [
    # data
    ("missing data folder", "{w}/nope --stitch_config {cfg}", "data folder '{w}/nope' does not exist"),
    ("empty data folder", "{w}/empty --stitch_config {cfg}", "data folder '{w}/empty' is empty"),
    ("data path is a file", "{w}/afile --stitch_config {cfg}", "is a file, not a folder; give the dataset root"),
    ("no train split", "{w}/only_val --stitch_config {cfg}", "has no train/ folder"),
    ("a folder of class folders, no splits", "{data}/train/ --stitch_config {cfg}",
     "lay it out as {data}/train/train/<class>/<image> and {data}/train/val/<class>/<image> (its sub-folders hold "
     "images, as class folders do: snnet quickstart {data}/train --out DIR splits such a folder"),
    ("images without class folders", "{w}/flat --stitch_config {cfg}", "has no class sub-folders"),
    ("class folders without images", "{w}/noimg --stitch_config {cfg}", "has class folders but no images"),
    ("eval without a val split", "{w}/noimg --stitch_config {cfg} --eval", "has no validation/ or val/ folder"),
    ("corrupt image in evaluation", "{w}/corrupt --stitch_config {cfg} --eval", "image '{victim}' cannot be read"),
    ("val with other classes", "{w}/otherval --stitch_config {cfg}",
     "(only in train/: '9'; only in val/: 'nine')"),
    ("symlink loop", "{w}/loop --stitch_config {cfg}", "the symlink '{w}/loop/train/3/again' loops back to"),
    ("batch larger than the dataset", "{data} --stitch_config {cfg} -b 512",
     "-b/--batch-size 512 gives no optimizer step: train folder '{data}/train' has 160 training images"),
    ("num-classes smaller than the classes", "{data} --stitch_config {cfg} --num-classes 5",
     "--num-classes 5 is smaller than the 10 classes"),
    ("results of another checkpoint in the folder", "{data} --stitch_config {cfg} --eval --experiment prev",
     "holds results of another checkpoint or config (cfg_id 0)"),
    # checkpoints
    ("missing checkpoint", "{data} --stitch_config {cfg} --resume {w}/none.pth",
     "checkpoint '{w}/none.pth' does not exist"),
    ("empty checkpoint", "{data} --stitch_config {cfg} --resume {w}/empty.pth", "is empty"),
    ("garbage checkpoint", "{data} --stitch_config {cfg} --resume {w}/garbage.pth", "cannot be read"),
    ("foreign file as checkpoint", "{data} --stitch_config {cfg} --resume {w}/weights.json", "cannot be read"),
    ("checkpoint holding a list", "{data} --stitch_config {cfg} --resume {w}/list.pth", "holds a list"),
    ("checkpoint of another config", "{data} --stitch_config {cfg} --resume {w}/other_config.pth.tar",
     "does not fit this model"),
    ("planted pickle (plain)", "{data} --stitch_config {cfg} --resume {w}/evil.pth",
     "holds pickled Python objects, which could run code (posix.system); it was refused unread"),
    ("planted pickle (torch.save)", "{data} --stitch_config {cfg} --resume {w}/evil_torch.pth",
     "holds pickled Python objects, which could run code (posix.system); it was refused unread"),
    ("missing anchor checkpoint", "{data} --stitch_config {w}/missing_anchor.json",
     "does not exist; give the path of an existing file"),
    ("anchor checkpoint of another model", "{data} --stitch_config {w}/wrong_anchor.json", "does not fit"),
    # configs
    ("missing stitch config", "{data} --stitch_config {w}/none.json", "stitch config '{w}/none.json' does not exist"),
    ("malformed JSON", "{data} --stitch_config {w}/bad.json", "is not valid JSON"),
    ("truncated JSON", "{data} --stitch_config {w}/trunc.json", "is not valid JSON"),
    ("JSON list instead of object", "{data} --stitch_config {w}/list.json", "expected a JSON object"),
    ("unknown config field", "{data} --stitch_config {w}/unknown.json", "did you mean 'stitch_kernel_size'"),
    ("wrong field type", "{data} --stitch_config {w}/type.json", "field 'stitch_stride' must be int, got '1'"),
    ("malformed YAML", "{data} --stitch_config {cfg} -c {w}/bad.yaml", "is not valid YAML"),
    ("unknown YAML key", "{data} --stitch_config {cfg} -c {w}/keys.yaml", "unknown key 'epoch'"),
    ("YAML not a mapping", "{data} --stitch_config {cfg} -c {w}/list.yaml", "must hold a mapping"),
    ("missing YAML", "{data} --stitch_config {cfg} -c {w}/none.yaml", "does not exist"),
    ("zero batch in YAML", "{data} --stitch_config {cfg} -c {w}/zero_batch.yaml",
     "-c/--config '{w}/zero_batch.yaml': key 'batch_size': 0 is not >= 1 (as for -b/--batch-size)"),
    ("number for a list in YAML", "{data} --stitch_config {cfg} -c {w}/scalar_mean.yaml",
     "key 'mean': 0.5 is not a list; write a list, e.g. [0.5]"),
    ("NaN lr in the stitch config", "{data} --stitch_config {w}/nan_lr.json",
     "stitch config '{w}/nan_lr.json': NaN is not a number here"),
    ("probability above 1 in the stitch config", "{data} --stitch_config {w}/bad_reprob.json",
     "field 'recipe.reprob': 2 is not a probability in [0, 1]"),
    # values
    ("zero batch", "{data} --stitch_config {cfg} -b 0", "-b/--batch-size: 0 is not >= 1"),
    ("negative lr", "{data} --stitch_config {cfg} --lr -1", "--lr: -1 is not >= 0"),
    ("zero image size", "{data} --stitch_config {cfg} --img-size 0", "--img-size: 0 is not >= 1"),
    ("image smaller than a patch", "{data} --stitch_config {cfg} --img-size 2",
     "cannot run a 2x2 image: its unit 'embed' fails"),
    ("zero epochs", "{data} --stitch_config {cfg} --epochs 0", "--epochs: 0 is not >= 1"),
    ("probability above 1", "{data} --stitch_config {cfg} --reprob 1.5", "1.5 is not a probability"),
    ("negative workers", "{data} --stitch_config {cfg} -j -1", "argument -j/--workers: -1 is not >= 0"),
    ("not a number", "{data} --stitch_config {cfg} --epochs ten", "--epochs: 'ten' is not an integer"),
    ("unknown flag", "{data} --stitch_config {cfg} --epoch 3", "unrecognized arguments: --epoch 3"),
    # models and stitching
    ("unknown timm name", "{data} --stitch_config {w}/unknown_model.json", "did you mean deit_small_patch16_224"),
    ("anchors not small to large", "{data} --stitch_config {w}/order.json", "not ordered small to large"),
    ("unequal depths", "{data} --stitch_config {w}/depth.json", "paired stitching needs anchors of equal depth"),
    ("cfg_id out of range", "{data} --stitch_config {cfg} --val-stitches 0 99", "--val-stitches [99] out of range"),
    ("unknown plain model", "{data} --model resnet1", "unknown timm model name 'resnet1'"),
    ("model and config together", "{data} --stitch_config {cfg} --model resnet18", "are exclusive"),
    ("unknown teacher", "{data} --stitch_config {cfg} --teacher regnety_16 --distillation-type hard",
     "unknown timm model name 'regnety_16'"),
    ("distillation without teacher", "{data} --stitch_config {cfg} --distillation-type soft", "needs --teacher NAME"),
    ("missing teacher checkpoint", "{data} --stitch_config {cfg} --distillation-type hard --teacher resnet18 "
     "--teacher-checkpoint {w}/no_teacher.pth", "'{w}/no_teacher.pth' does not exist"),
    ("teacher checkpoint of another model", "{data} --stitch_config {cfg} --distillation-type hard --teacher resnet18 "
     "--teacher-checkpoint {w}/other_config.pth.tar", "does not fit the teacher 'resnet18'"),
    ("unknown optimizer", "{data} --stitch_config {cfg} --opt adamx", "--opt 'adamx'"),
    ("unknown scheduler", "{data} --stitch_config {cfg} --sched cosin", "--sched 'cosin'"),
    ("CUDA on a CPU machine", "{data} --stitch_config {cfg} --device cuda", "CUDA is not available here"),
    ("no such device", "{data} --stitch_config {cfg} --device gpu0", "--device 'gpu0' is not a torch device"),
    ("a device torch knows but this machine lacks", "{data} --stitch_config {cfg} --device mps",
     "--device mps: mps is not available here"),
    ("the meta device", "{data} --stitch_config {cfg} --device meta", "a meta tensor holds no values"),
    ("evaluate a checkpoint on a folder of other classes", "{data} --stitch_config {cfg} --eval --resume "
     "{w}/other_names.pth.tar", "does not hold the 10 classes checkpoint '{w}/other_names.pth.tar' was trained on "
     "(missing 'nine'; not trained on '9')"),
    ("a config's num_classes below the data's", "{data} --stitch_config {w}/five.json",
     "the 10 classes of train folder '{data}/train': labels 5..9 would have no output; raise it to 10 or leave it out "
     "(the default is the number of classes of the data) (num_classes 5 comes from stitch config '{w}/five.json': "
     "change it there"),
    ("split-bn without splits", "{data} --stitch_config {cfg} --split-bn", "--split-bn needs --aug-splits > 1"),
    ("auto-resume without experiment", "{data} --stitch_config {cfg} --auto-resume", "needs --experiment NAME"),
    # configs that used to be silently accepted, inputs that used to fail late or with a traceback
    ("duplicate key in the stitch config", "{data} --stitch_config {w}/dup.json", "key(s) 'epochs' given twice"),
    ("duplicate key in the YAML", "{data} --stitch_config {cfg} -c {w}/dup.yaml", "key 'epochs' is given twice"),
    ("NaN in the YAML", "{data} --stitch_config {cfg} -c {w}/nan.yaml", "key 'lr': 'nan' is not a finite number"),
    ("unknown eval metric", "{data} --stitch_config {cfg} --eval-metric bogus",
     "argument --eval-metric: 'bogus' is not a metric of the validation panel"),
    ("eval metric outside the panel", "{data} --stitch_config {cfg} --val-stitches 0 1 --eval-metric top1@5",
     "cfg_id 5 is not in the validation panel [0, 1]"),
    ("output below a file", "{data} --stitch_config {cfg} --experiment prev/last.pth.tar/x",
     "last.pth.tar' is a file"),
    ("unknown pretrained tag", "{data} --model resnet18.bogus", "unknown pretrained tag 'bogus' of 'resnet18'"),
    ("unknown augmentation policy", "{data} --stitch_config {cfg} --aa garbage",
     "the training augmentation cannot be built"),
    ("model kwargs of the wrong type", "{data} --stitch_config {cfg} --model-kwargs mlp_ratio=abc",
     "cannot create 'deit_tiny_patch16_224' with arguments"),
    ("model kwargs timm asserts on", "{data} --stitch_config {cfg} --model-kwargs depth=-1",
     "(RuntimeError: number of steps must be non-negative"),
    # numbers timm and torch take without a word, though they change the run
    ("crop 0", "{data} --stitch_config {cfg} --crop-pct 0", "argument --crop-pct: 0 is not in (0, 1]"),
    ("crop above 1", "{data} --stitch_config {cfg} --crop-pct 1.5", "argument --crop-pct: 1.5 is not in (0, 1]"),
    ("negative decay rate", "{data} --stitch_config {cfg} --sched step --decay-rate -0.1",
     "argument --decay-rate/--dr: -0.1 is not >= 0"),
    ("min-lr above lr", "{data} --stitch_config {cfg} --lr 1e-4 --min-lr 1e-3", "--min-lr 0.001 is above the LR"),
    ("momentum above 1", "{data} --stitch_config {cfg} --momentum 1.5",
     "argument --momentum: 1.5 is not a probability in [0, 1]"),
    ("scale min above max", "{data} --stitch_config {cfg} --scale 1.0 0.5", "--scale 1.0 0.5: must be MIN MAX"),
    ("EMA decay 1", "{data} --stitch_config {cfg} --model-ema --model-ema-decay 1", "--model-ema-decay 1.0"),
    ("negative seed", "{data} --stitch_config {cfg} --seed -1", "argument --seed: -1 is not >= 0"),
    ("mean of two channels", "{data} --stitch_config {cfg} --mean 0.5 0.5", "give 1 or 3 values"),
    ("zero std", "{data} --stitch_config {cfg} --std 0", "argument --std: 0 is not > 0"),
    ("unknown interpolation", "{data} --stitch_config {cfg} --interpolation cubic",
     "argument --interpolation: 'cubic' is not one of '', 'nearest'"),
    ("step schedule without decay epochs", "{data} --stitch_config {cfg} --sched step --decay-epochs 0",
     "--decay-epochs 0.0: must be > 0 with --sched step"),
    ("negative cooldown", "{data} --stitch_config {cfg} --cooldown-epochs -1",
     "argument --cooldown-epochs: -1 is not >= 0"),
    ("negative warm-up", "{data} --stitch_config {cfg} --warmup-epochs -2", "argument --warmup-epochs: -2 is not >= 0"),
    ("negative aug-splits", "{data} --stitch_config {cfg} --aug-splits -1", "argument --aug-splits: -1 is not >= 0"),
    ("negative distillation temperature", "{data} --stitch_config {cfg} --distillation-tau -3",
     "argument --distillation-tau: -3 is not > 0"),
    ("negative aug-repeats", "{data} --stitch_config {cfg} --aug-repeats -1",
     "argument --aug-repeats: -1 is not a whole number >= 0"),
    ("fractional aug-repeats", "{data} --stitch_config {cfg} --aug-repeats 2.5",
     "argument --aug-repeats: 2.5 is not a whole number >= 0"),
    ("no epoch left to train", "{data} --stitch_config {cfg} --epochs 2 --start-epoch 2",
     "leaves no epoch to train of --epochs 2"),
    ("optimizer beta of 1.5", "{data} --stitch_config {cfg} --opt-betas 0.9 1.5", "--opt-betas 0.9 1.5"),
    ("unknown compile backend", "{data} --stitch_config {cfg} --torchcompile fastest",
     "--torchcompile 'fastest' is not a torch.compile backend"),
    ("compile with checkpointing", "{data} --stitch_config {cfg} --torchcompile eager --grad-checkpointing",
     "--torchcompile with --grad-checkpointing"),
    ("frozen plain model", "{data} --model resnet18 --freeze-anchors", "leaves nothing to train"),
    ("unknown sampler type", "{data} --stitch_config {w}/rso.json", "sampler type 'rso' is not known"),
    ("ROS gap wider than the FLOPs range", "{data} --stitch_config {w}/wide_gap.json",
     "puts all 12 routes in one bucket"),
    # data that would silently change the task
    ("hidden folder as a class", "{w}/hidden --stitch_config {cfg}", "'.ipynb_checkpoints'"),
    ("16-bit validation image", "{w}/wide --stitch_config {cfg} --eval", "is a I;16 (16/32-bit) image"),
    ("macOS metadata file", "{w}/mac --stitch_config {cfg} --eval",
     "is macOS's metadata of 'scan.png' (an AppleDouble file), not an image"),
    ("class map leaving a class out", "{data} --stitch_config {cfg} --class-map {w}/nine.txt --num-classes 10",
     "leaves out ('9')"),
    # every data source passes the same checks before any work: local Hugging Face datasets (parquet)
    ("parquet without a label column", "{w}/hf --dataset hfds/nolabel --stitch_config {cfg}",
     "train parquet file '{w}/hf/nolabel/data/train-00000-of-00001.parquet' has no 'label' column (it has image, "
     "target)"),
    ("parquet with string labels", "{w}/hf --dataset hfds/strlabel --stitch_config {cfg}",
     "strlabel/data/train-00000-of-00001.parquet': its 'label' column holds string, not integer class indices"),
    ("truncated parquet", "{w}/hf --dataset hfds/cut --stitch_config {cfg} --eval",
     "validation parquet file '{w}/hf/cut/data/validation-00000-of-00001.parquet' cannot be read"),
    ("corrupt parquet (streamed)", "{w}/hf --dataset hfids/junk --stitch_config {cfg}",
     "train parquet file '{w}/hf/junk/data/train-00000-of-00001.parquet' cannot be read"),
    ("integer labels without class names", "{w}/hf --dataset hfds/plain --stitch_config {cfg}",
     "holds plain integers 0..9 and no class names (no ClassLabel feature), so the class count cannot be read (timm "
     "would build a 1000-class head); pass --num-classes 10"),
    ("num-classes below the parquet labels", "{w}/hf --dataset hfds/plain --stitch_config {cfg} --num-classes 5",
     "--num-classes 5 is smaller than the labels of parquet file"),
    ("num-classes below the ClassLabel names", "{w}/hf --dataset hfids/named --stitch_config {cfg} --num-classes 5",
     "--num-classes 5 is smaller than the 10 classes of --dataset hfids/named"),
    ("unreadable image in a parquet validation split", "{w}/hf --dataset hfds/badimage --stitch_config {cfg} --eval",
     "validation parquet file '{w}/hf/badimage/data/validation-00000-of-00001.parquet': the image of row 3 cannot be "
     "read"),
    # what only the built network tells: the preflight builds it on the meta device (no weight, no image)
    ("more positions asked than a pair has", "{data} --stitch_config {w}/per_pair.json", "per_pair 99 but"),
    ("anchors whose tokens never match", "{data} --stitch_config {w}/coarse.json", "cannot stitch"),
    ("train_exclude naming no route", "{data} --stitch_config {w}/exclude.json",
     "train_exclude [40] names cfg_ids this network does not have"),
]


def snapshot(folder: Path) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case,argv,message", CASES, ids=[c[0] for c in CASES])
@pytest.mark.slow
def test_bad_input(case, argv, message, world, digits_folder, tiny_config, tmp_path, cli):
    if torch.cuda.is_available() and "cuda" in argv:
        pytest.skip("this machine has CUDA")
    fill = lambda s: s.format(w=world, cfg=tiny_config, data=digits_folder, victim=(world / "victim").read_text())
    out = tmp_path / "runs"
    (out / "prev").mkdir(parents=True)
    (out / "prev" / "last.pth.tar").write_bytes(b"an earlier run's checkpoint")
    (out / "prev" / "stitches_res.txt").write_text('{"cfg_id": 0}\n')
    before = snapshot(tmp_path)
    named = "--auto-resume" in argv or "--experiment" in argv
    # the case's own flags come last and win
    argv = FAST + fill(argv).split() + ["--output", str(out)] + ([] if named else ["--experiment", "new"])
    PWNED.unlink(missing_ok=True)
    code, _, err = cli.call("train", argv)
    err = err.strip()
    assert code == 2, (case, err)
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert fill(message) in err, err
    assert snapshot(tmp_path) == before, "files were written or overwritten"
    assert not PWNED.exists(), "the planted pickle ran code"


# the outside catalogues' residue, each one line before any work (no warning or log line first: these run
# with Python's warnings shown, as a user sees them), naming the value
CASES40 = [
    ("ROS gap 0", "{data} --stitch_config {w}/ros_gap0.json", "ros option gap 0 must be a number > 0"),
    ("ROS gap -1", "{data} --stitch_config {w}/ros_gap_neg.json", "ros option gap -1 must be a number > 0"),
    ("ROS gap 1e9", "{data} --stitch_config {w}/ros_gap_huge.json", "puts all 12 routes in one bucket"),
    ("ROS gap a string", "{data} --stitch_config {w}/ros_gap_str.json", "ros option gap 'wide' must be a number"),
    ("stitch_stages for plain ViT anchors", "{data} --stitch_config {w}/vit_stages.json",
     "'stitch_stages' [1, 2] takes hierarchical anchors"),
    ("class map listing a class twice", "{data} --stitch_config {cfg} --class-map {w}/twice.txt",
     "lists class '3' twice"),
    ("one beta for adamw", "{data} --stitch_config {cfg} --opt-betas 0.9", "--opt-betas 0.9: --opt adamw takes two"),
    ("negative color jitter", "{data} --stitch_config {cfg} --color-jitter -1", "--color-jitter -1: must be >= 0"),
    ("freeze-anchors with one anchor", "{data} --stitch_config {w}/one_anchor.json --freeze-anchors",
     "--freeze-anchors leaves nothing to train"),
    ("resume a finished run with another num-classes", "{data} --stitch_config {cfg} --epochs 1 "
     "--resume {w}/ten_classes.pth.tar --num-classes 12", "has a classifier for 10 classes (anchors.0.head.weight"),
    ("resume with a config's other num_classes", "{data} --stitch_config {w}/twelve.json --epochs 1 "
     "--resume {w}/ten_classes.pth.tar", "not the num_classes 12 of stitch config '{w}/twelve.json'; set it to 10 "
     "there, or pass --num-classes 10"),
]


@pytest.fixture(scope="module")
def cli_warnings(tmp_path_factory):
    runner = ForkedCli(tmp_path_factory.mktemp("cliw"), warnings=True)
    yield runner
    runner.close()


@pytest.mark.parametrize("case,argv,message", CASES40, ids=[c[0] for c in CASES40])
@pytest.mark.slow
def test_bad_input_40(case, argv, message, world, digits_folder, tiny_config, tmp_path, cli_warnings):
    test_bad_input(case, argv, message, world, digits_folder, tiny_config, tmp_path, cli_warnings)


# what the runs learned late, now learned by the checks (the meta-device network against the checkpoint's
# keys and shapes, no weight read; the cfg_ids against the network)
CASES54 = [
    ("anchor checkpoint that is a folder", "{data} --stitch_config {w}/folder_anchor.json",
     "checkpoint of anchor 'deit_tiny_patch16_224' '{w}/ckpt_folder' is a folder, not a checkpoint file; give the "
     "path of the file, e.g. '{w}/ckpt_folder/last.pth.tar'"),
    ("eval of a checkpoint trained at another image size", "{data} --stitch_config {cfg} --eval --resume "
     "{w}/img32.pth.tar", "the checkpoint was trained at image size 32, the network built for 16: use img_size=32"),
    ("plain model checkpoint resumed into a stitch config", "{data} --stitch_config {cfg} --resume {w}/plain.pth.tar",
     "it is a plain model's checkpoint ('deit_tiny_patch16_224'), not an SN-Net's: resume it with --model"),
    ("stitch checkpoint resumed into a plain model", "{data} --model resnet18 --resume {w}/ten_classes.pth.tar",
     "it is an SN-Net's checkpoint: pass the --stitch_config it was trained with instead of --model"),
    ("resume another optimizer's state", "{data} --stitch_config {cfg} --epochs 2 --opt adamw --resume "
     "{w}/sgd_state.pth.tar", "holds the state of --opt sgd, this run builds --opt adamw (set by the command line); "
     "resume with --opt sgd, or pass --no-resume-opt"),
    ("save-predictions cfg_id out of range", "{data} --stitch_config {cfg} --save-predictions 99",
     "--save-predictions 99: cfg_id [99] out of range; this network has cfg_ids 0..11"),
    ("validation image over PIL's size limit", "{w}/bomb_val --stitch_config {cfg} --eval",
     "validation image '{w}/bomb_val/val/3/zz.png' is too large for PIL"),
]


@pytest.mark.parametrize("case,argv,message", CASES54, ids=[c[0] for c in CASES54])
@pytest.mark.slow
def test_bad_input_54(case, argv, message, world, digits_folder, tiny_config, tmp_path, cli):
    """As the catalogue's cases, and refused by the checks themselves: distributed_train.sh's check (the preflight
    entry, which does no work) says the same line, so train.py, which runs those checks first, says it before its
    first log line (these were refused after the network was built and the run had logged)."""
    test_bad_input(case, argv, message, world, digits_folder, tiny_config, tmp_path, cli)
    fill = lambda s: s.format(w=world, cfg=tiny_config, data=digits_folder)
    code, _, err = cli.call("preflight", ["1", *FAST, *fill(argv).split(), "--output", tmp_path / "pre",
                                          "--experiment", "new"])
    assert code == 2 and fill(message) in err, err
    assert not (tmp_path / "pre").exists()


def test_training_image_over_pils_size_limit_is_skipped_in_one_line(world, tiny_config, tmp_path, cli):
    """A 196-Mpx training image (PIL's DecompressionBombError, which timm's loader lets through: it was a traceback
    after the run had written files) is skipped as a corrupt one is, one warning naming it, and the run goes on."""
    bomb = world / "bomb_train" / "train" / "3" / "zz.png"
    code, _, err = cli.call("train", FAST + [world / "bomb_train", "--stitch_config", tiny_config, "--epochs", "1",
                                             "--output", tmp_path, "--experiment", "x", "--save-predictions", "none"])
    assert code == 0 and "Traceback" not in err, err
    skipped = [line for line in err.splitlines() if "skipped" in line]
    assert skipped and all(f"skipped training image '{bomb}' (too large for PIL: 196,000,000 pixels, over its "
                           f"limit of 178,956,970; downscale it); the next image is used in its place" in line
                           and line.count("warning: ") == 1 for line in skipped), err
    assert (tmp_path / "x" / "last.pth.tar").exists()


def test_catalogue_is_large_enough():
    assert len(CASES) >= 60


# ------------------------------------------------------------------------------ the snnet command, part 4
DEMO = Path(__file__).resolve().parent.parent / "results" / "demo"


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    """Results files as users bring them: Notepad's byte-order mark and CRLF, a predictions file cut short, a file
    without its anchors."""
    w = tmp_path_factory.mktemp("bad4")
    lines = (DEMO / "stitches_res.txt").read_text().splitlines()
    (w / "bom").mkdir()
    (w / "bom" / "stitches_res.txt").write_bytes(b"\xef\xbb\xbf" + "".join(l + "\r\n" for l in lines).encode())
    (w / "cut").mkdir()
    (w / "cut" / "stitches_res.txt").write_text("\n".join(lines) + "\n")
    (w / "cut" / "stitches_pred.npz").write_bytes((DEMO / "stitches_pred.npz").read_bytes()[:3000])
    (w / "noanchors").mkdir()
    n = sum(1 for l in lines if "->" not in json.loads(l)["route"])  # the anchors: routes without a stitch
    (w / "noanchors" / "stitches_res.txt").write_text("".join(l + "\n" for l in lines[n:]))
    (w / "noanchors" / "stitches_pred.npz").write_bytes((DEMO / "stitches_pred.npz").read_bytes())
    return w


SNNET_CASES = [
    ("truncated predictions file", "pareto {w}/cut/stitches_res.txt --baselines --out {out}",
     "'{w}/cut/stitches_pred.npz' is not a predictions file (BadZipFile"),
    ("pareto --baselines without the anchors", "pareto {w}/noanchors/stitches_res.txt --baselines --out {out}",
     "--baselines: '{w}/noanchors/stitches_res.txt' holds no anchor's record"),
]


@pytest.mark.parametrize("case,argv,message", SNNET_CASES, ids=[c[0] for c in SNNET_CASES])
def test_bad_input_snnet(case, argv, message, world4, tmp_path, cli):
    fill = lambda s: s.format(w=world4, out=tmp_path / "out")
    before = snapshot(world4)
    code, _, err = cli.call("snnet", fill(argv).split())
    err = err.strip()
    assert code == 2, (case, err)
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert fill(message) in err, err
    assert snapshot(world4) == before and not (tmp_path / "out").exists(), "files were written or overwritten"


def test_results_with_bom_and_crlf_are_read(world4, tmp_path, cli):
    code, out, err = cli.call("snnet", ["pareto", world4 / "bom" / "stitches_res.txt", "--out", tmp_path])
    assert code == 0, err
    want = json.loads((DEMO / "pareto_flops.json").read_text())["files"][0]["front"]
    assert json.loads((tmp_path / "pareto_flops.json").read_text())["files"][0]["front"] == want


def test_pareto_without_anchors_shows_the_front(world4, tmp_path, cli):
    code, _, err = cli.call("snnet", ["pareto", world4 / "noanchors" / "stitches_res.txt", "--out", tmp_path])
    assert code == 0, err
    assert "holds no anchor's record: its front quality is left out" in err


# ------------------------------------------------------------------------------ shared folders and full disks
@contextmanager
def lock_held_by_another_process(folder):
    """A second process holding FolderLock(folder), as a first run does; yields its pid, kill -9 at the end.
    (Not this test process: POSIX locks are per process, and reading the lock file here would release it.)"""
    code = ("import sys, time; sys.path.insert(0, sys.argv[2]); from snnet.utils.fileio import FolderLock; "
            "FolderLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)")
    p = subprocess.Popen([sys.executable, "-c", code, str(folder), str(DEMO.parent.parent)], stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        yield p.pid
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()


def test_second_run_into_a_busy_folder_is_refused(digits_folder, tiny_config, tmp_path, cli):
    """Two runs into one --output/--experiment: the second is refused in one line before any work."""
    busy = tmp_path / "runs" / "busy"
    with lock_held_by_another_process(busy) as pid:
        (busy / "last.pth.tar").write_bytes(b"the first run's checkpoint")
        before = snapshot(tmp_path)
        code, _, err = cli.call("train", FAST + [digits_folder, "--stitch_config", tiny_config, "--output",
                                                 tmp_path / "runs", "--experiment", "busy", "--epochs", "1"])
        assert code == 2, err
        err = err.strip()
        assert err.count("\n") == 0 and "Traceback" not in err, err
        assert f"folder '{busy}' is in use by another run (pid {pid} on" in err, err
        assert snapshot(tmp_path) == before


def test_two_runs_started_at_once_the_second_is_refused_before_any_work(digits_folder, tiny_config, tmp_path,
                                                                         monkeypatch, capsys):
    """Two runs started at the same moment into one folder both find it free; the one that locks it second is
    refused when it locks, which is before its checks, logs and work (it was after its LS init): the lock is taken
    right after the folder is checked (simulated: another process locks it in between)."""
    from contextlib import ExitStack

    from snnet.train import main as train_main
    busy = tmp_path / "runs" / "busy"
    real_check, worked = train_main.check_output, []
    argv = [str(a) for a in FAST + [digits_folder, "--stitch_config", tiny_config, "--output", tmp_path / "runs",
                                    "--experiment", "busy"]]
    with ExitStack() as other_run:
        def check_then_lose_the_race(path):
            real_check(path)
            other_run.enter_context(lock_held_by_another_process(busy))
        monkeypatch.setattr(train_main, "check_output", check_then_lose_the_race)
        monkeypatch.setattr(train_main, "check_run", lambda *a, **k: worked.append("checks"))
        monkeypatch.setattr(train_main.Trainer, "for_run", classmethod(lambda *a, **k: worked.append("work")))
        assert train_main.main(argv) == 2
    assert f"folder '{busy}' is in use by another run" in capsys.readouterr().err
    assert worked == []


def test_lock_of_a_killed_run_is_not_stuck(tmp_path):
    """kill -9 of the holder: the kernel releases the lock; the next run takes it, and removes the file after."""
    from snnet.utils.fileio import FolderLock, lock_holder
    folder = tmp_path / "run"
    with lock_held_by_another_process(folder) as pid:
        assert lock_holder(folder).startswith(f"pid {pid} on ")
    assert (folder / FolderLock.NAME).exists()  # left behind by the killed run, but not held
    assert lock_holder(folder) is None
    with FolderLock(folder):
        assert f"pid {os.getpid()} on " in (folder / FolderLock.NAME).read_text()
    assert not (folder / FolderLock.NAME).exists()


def test_other_ranks_of_the_run_do_not_see_rank_0s_lock_as_another_run(tmp_path, monkeypatch):
    """Under torchrun, rank 0 takes the folder's lock and every rank checks its inputs: a rank that checks after rank
    0 took it must not refuse its own run's folder (rank 1 exited 2 and torchrun restarts hung); rank 0, and the
    launcher's one-process check, still refuse another run's lock."""
    from snnet.train.preflight import OutputError, check_output
    folder = tmp_path / "run"
    with lock_held_by_another_process(folder):
        monkeypatch.setenv("RANK", "1")
        check_output(folder)
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(OutputError, match="is in use by another run"):
            check_output(folder)


def test_a_refused_run_leaves_no_folder(tmp_path):
    from snnet.utils.fileio import FolderLock
    with FolderLock(tmp_path / "a" / "b"):
        pass
    assert list(tmp_path.iterdir()) == []


def test_full_disk_under_snnet_out(small_disk, cli):
    (small_disk / "filler").write_bytes(b"x" * (60 << 10))
    code, _, err = cli.call("snnet", ["pareto", DEMO / "stitches_res.txt", "--out", small_disk / "out"])
    err = err.strip()
    assert code == 2, err
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert f"disk full: writing 'pareto_flops.png' into folder '{small_disk / 'out'}' needs" in err, err
    assert not [p for p in (small_disk / "out").iterdir() if p.name.endswith(".tmp")]  # nothing torn


def test_full_disk_checkpoint_injected(tmp_path, monkeypatch):
    """ENOSPC injected where torch.save writes (as the kernel gives it on a full disk): one message naming the
    folder and the bytes the checkpoint needs; no temporary file left, the old checkpoint untouched."""
    import errno

    from snnet.utils import checkpoint
    from snnet.utils.fileio import DiskFullError
    (tmp_path / "last.pth.tar").write_bytes(b"old")

    def full(obj, f, *a, **k):
        Path(f).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(DiskFullError, match=r"disk full: writing 'last.pth.tar' into folder '.*' needs about 4,000 "
                                            r"bytes \([\d,]+ bytes free there\)"):
        checkpoint.save_checkpoint(tmp_path / "last.pth.tar", {"w": torch.zeros(1000)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth.tar"]
    assert (tmp_path / "last.pth.tar").read_bytes() == b"old"


def test_full_disk_at_the_start_is_one_line(small_disk, digits_folder, tiny_config, cli):
    """An --output on a disk already full: the run's first write (its lock file) says so in one line naming the
    folder and the bytes needed, and leaves nothing (it was a 10-line OSError traceback and an empty lock file)."""
    fd = os.open(small_disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:  # filled to the last byte
        while os.write(fd, bytes(4096)):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    before = snapshot(small_disk)
    code, _, err = cli.call("train", FAST + [digits_folder, "--stitch_config", tiny_config, "--output", small_disk,
                                             "--experiment", "x"])
    err = err.strip()
    assert code == 2 and err.count("\n") == 0 and "Traceback" not in err, err
    assert f"disk full: writing the lock file '.snnet.lock' into folder '{small_disk / 'x'}' needs about" in err, err
    assert snapshot(small_disk) == before and not (small_disk / "x").exists()


def test_full_disk_at_the_lock_injected(tmp_path, monkeypatch):
    """ENOSPC injected where the lock file is written (where no small disk can be mounted): one line naming the
    folder and the bytes needed; the lock file and the folders it made are gone."""
    import errno

    from snnet.utils import fileio
    real_write = os.write

    def write(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(fileio.FolderLock.NAME):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)
    monkeypatch.setattr(fileio.os, "write", write)
    with pytest.raises(fileio.DiskFullError, match=r"disk full: writing the lock file '.snnet.lock' into folder "
                                                   f"'{tmp_path / 'a' / 'run'}' needs about \\d+ bytes"):
        fileio.FolderLock(tmp_path / "a" / "run").acquire()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dataset,extra",
                         [("hfds/named", []), ("hfids/named", []), ("hfds/plain", ["--num-classes", "10"])])
def test_good_parquet_passes_the_preflight(world, tiny_config, tmp_path, cli, dataset, extra):
    """The checks refuse only what is wrong: ClassLabel names, or plain integers with --num-classes, pass."""
    code, _, err = cli.call("preflight", ["1", world / "hf", "--dataset", dataset, "--stitch_config", tiny_config,
                                          *FAST, "--output", tmp_path, *extra])
    assert code == 0, err


@pytest.mark.parametrize("output", ["/proc/snnet", "/sys/snnet"])
def test_an_output_folder_the_kernel_refuses_is_one_line(digits_folder, tiny_config, cli, output):
    """Permission bits say yes (root, or /proc's own modes), the kernel says no: refused by trying, before any work
    (it was a traceback from the first mkdir)."""
    code, _, err = cli.call("train", FAST + [digits_folder, "--stitch_config", tiny_config, "--output", output,
                                             "--experiment", "x"])
    err = err.strip()
    assert code == 2 and err.count("\n") == 0 and "Traceback" not in err, err
    assert f"output folder '{output}/x'" in err and "pass another --output" in err, err


def test_an_output_folder_below_one_that_cannot_be_entered(tmp_path, monkeypatch):
    """A folder this user cannot enter (as a non-root user sees /root): pathlib's exists() raised PermissionError
    below it; the folder is named instead. (Simulated: root enters every folder.)"""
    from snnet.train.preflight import OutputError, check_output
    locked = tmp_path / "locked"
    (locked / "inner").mkdir(parents=True)
    real_stat, real_access = os.stat, os.access

    def stat(path, *a, **kw):
        if str(path).startswith(str(locked) + os.sep):
            raise PermissionError(13, "Permission denied", str(path))
        return real_stat(path, *a, **kw)
    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(locked) else real_access(p, mode))
    with pytest.raises(OutputError, match=f"'{locked}' does not allow it"):
        check_output(locked / "inner" / "run")


@pytest.mark.slow
def test_the_preflight_fits_checkpoints_without_reading_their_weights(world, tiny_config, tmp_path, monkeypatch):
    """The fit of --resume/--initial-checkpoint/anchor checkpoints is judged from keys and shapes: a torch file is
    memory-mapped, a safetensors file read as far as its header (meta tensors), so a big checkpoint costs the
    preflight no read of its weights; a misfit is still named (here another image size)."""
    from safetensors.torch import save_file

    from snnet import build_snnet, load_stitch_config
    from snnet.train.resume import fitting_checkpoint
    from snnet.utils import checkpoint
    from snnet.utils.checkpoint import CheckpointError, load_checkpoint
    weights = torch.load(world / "img32.pth.tar", weights_only=True)["state_dict"]  # an SN-Net at 32 px
    save_file(weights, tmp_path / "net.safetensors")
    monkeypatch.setattr(checkpoint, "load_file", lambda *a, **k: pytest.fail("safetensors weights were read"))
    lazy = load_checkpoint(tmp_path / "net.safetensors", lazy=True)["state_dict"]
    assert {k: (v.shape, v.dtype) for k, v in lazy.items()} == {k: (v.shape, v.dtype) for k, v in weights.items()}
    assert all(v.is_meta for v in lazy.values())
    real_load, loads = torch.load, []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k) or real_load(*a, **k))
    with torch.device("meta"):
        meta16 = build_snnet(load_stitch_config(tiny_config), pretrained=False, img_size=16, num_classes=10)
    for path in (tmp_path / "net.safetensors", world / "img32.pth.tar"):
        with pytest.raises(CheckpointError, match="the checkpoint was trained at image size 32, the network built "
                                                  "for 16"):
            fitting_checkpoint(meta16, str(path), structure_only=True)
    assert loads and all(k.get("mmap") and k.get("weights_only") for k in loads)  # the torch file memory-mapped
