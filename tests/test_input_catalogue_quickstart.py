"""The bad-input catalogue of `snnet quickstart`, `snnet convert` and `snnet serve`: each case ends with exit code 2,
one line on stderr naming the value and the fix, no traceback, nothing written (quickstart's --out is not even made)
and nothing started, as the earlier catalogues (tests/test_input_catalogue.py). Each runs the snnet command as a user
does (helpers.ForkedCli: a fresh process with its real stderr). Then the unusual but valid inputs: they run, or skip
a file with a warning naming it."""
import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT
from PIL import Image

DEMO = Path(ROOT) / "results" / "demo"


def _shapes():
    spec = importlib.util.spec_from_file_location("shapes_data", Path(ROOT) / "benchmarks" / "shapes_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shapes(root: Path, kinds=("circle", "square", "ring"), train: int = 10, val: int = 2, flat: bool = True) -> Path:
    return _shapes().write(root, list(kinds), train, val, size=16, flat=flat)


def snapshot(folder: Path) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = tmp_path_factory.mktemp("bad75")
    shapes(w / "grow")
    shapes(w / "few", train=4, val=1)  # 15 images
    shapes(w / "oneclass", kinds=("circle",))
    lone = shapes(w / "lone")  # a class of one image
    for p in sorted((lone / "ring").iterdir())[1:]:
        p.unlink()
    raw = shapes(w / "raw")  # a class of a camera's raw files but one
    for p in sorted((raw / "ring").iterdir())[1:]:
        p.with_suffix(".CR2").write_bytes(b"II*\0\x10\0\0\0CR\x02\0" + bytes(64))
        p.unlink()
    for cls in ("a", "b"):  # nothing but raw files
        (w / "rawonly" / cls).mkdir(parents=True)
        (w / "rawonly" / cls / "IMG_0001.CR2").write_bytes(b"II*\0\x10\0\0\0CR\x02\0" + bytes(64))
    deep = shapes(w / "deep")  # a class of 16-bit scans but one
    for p in sorted((deep / "ring").iterdir())[1:]:
        Image.fromarray(np.full((16, 16), 4000, dtype=np.uint16)).save(p)
    tvone = shapes(w / "tvone", train=4, val=1, flat=False)  # train/ and val/, val/ring empty
    for p in (tvone / "val" / "ring").iterdir():
        p.unlink()
    unlabelled = shapes(w / "unlabelled", train=4, val=1, flat=False)  # test/: a competition's images, no labels
    (unlabelled / "val").rename(unlabelled / "test")
    for p in sorted((unlabelled / "test").rglob("*.png")):
        p.rename(unlabelled / "test" / f"{p.parent.name}_{p.name}")
    for d in [d for d in (unlabelled / "test").iterdir() if d.is_dir()]:
        d.rmdir()
    # an --out that quickstart split DATA into, before a class was added to DATA
    from snnet.quickstart import SEED, _split_record, read_data, write_split
    grown = shapes(w / "grown")
    summary = read_data(grown.resolve(), (w / "used").resolve())
    write_split(summary, (w / "used").resolve(), _split_record(grown.resolve(), summary, SEED, 32))
    shutil.copytree(grown / "ring", grown / "star")
    # SN-Net's LeViT release of anchors of two depths (128S: 2-3-4, 128: 4-4-4), and one whose blocks have a gap
    import timm

    from stitching_levit.convert import ours_to_snnet
    a, b = (timm.create_model(n, num_classes=3).state_dict() for n in ("levit_128s", "levit_128"))
    release = {**{f"anchors.0.{k}": v for k, v in ours_to_snnet(a, (2, 3, 4)).items()},
               **{f"anchors.1.{k}": v for k, v in ours_to_snnet(b, (4, 4, 4)).items()}}
    torch.save({"model": release, "args": argparse.Namespace(model="snnet_levit")}, w / "levit.pth")
    broken = {k: v for k, v in release.items() if not k.startswith("anchors.1.blocks.5.")}
    torch.save({"model": broken, "args": argparse.Namespace(model="snnet_levit")}, w / "levit_gap.pth")
    # a timm network's training checkpoint (pickled arguments, as timm's train.py saves it)
    plain = timm.create_model("resnet18", num_classes=3, channels=[4, 8, 16, 32], stem_width=2, stem_type="deep")
    torch.save({"state_dict": plain.state_dict(), "arch": "resnet18", "args": argparse.Namespace(lr=0.1),
                "epoch": 2}, w / "timm_resnet.pth.tar")
    # one stitch of the committed demo exported, and a results file of another checkpoint
    from snnet.deploy.export import export_stitch, load_snnet
    export_stitch(load_snnet(DEMO / "snnet.pth.tar", None, None, None), 3, w / "export3", formats=())
    records = [json.loads(line) for line in (DEMO / "stitches_res.txt").read_text().splitlines()]
    (w / "other_res.txt").write_text("".join(json.dumps({**r, "checkpoint_sha256": "ab" * 32}) + "\n"
                                             for r in records))
    (w / "hub").mkdir()  # an empty Hugging Face cache
    return w


QS = "quickstart {w}/grow --out {out} --widths 4 8 --img-size 16"
CASES = [  # (case, argv, the words of the one line, environment added)
    ("quickstart --seed -1", QS + " --seed -1", "--seed -1 is outside 0..2147483647", None),
    ("quickstart --widths not smallest first", QS + " --widths 8 4", "--widths 8 4: give 2 or more widths, smallest "
     "first", None),
    ("quickstart one anchor", "quickstart {w}/grow --out {out} --anchors resnet18 --no-pretrained",
     "--anchors resnet18: an SN-Net stitches at least 2 anchors", None),
    ("quickstart --widths with --anchors", "quickstart {w}/grow --out {out} --anchors resnet18 resnet34 --widths 4 8 "
     "--no-pretrained", "--widths 4 8 sets quickstart's own CNN anchors, which --anchors replaces", None),
    ("quickstart --batch over the images", "quickstart {w}/few --out {out} --nproc 1 --batch 32",
     "--batch 32 gives no training step: the SN-Net draws the 12 training images an epoch", None),
    ("quickstart --batch over a process's images", "quickstart {w}/grow --out {out} --nproc 2 --batch 16",
     "each of the SN-Net's 2 processes draws 15 of the 30 training images an epoch, and a training batch is never "
     "short; give --batch 15 or less", None),
    ("quickstart unknown timm name", "quickstart {w}/grow --out {out} --anchors resnet18 resnte34 --no-pretrained",
     "--anchors resnte34: unknown timm model name 'resnte34': did you mean resnet34", None),
    ("quickstart plain ViTs larger in front", "quickstart {w}/grow --out {out} --anchors deit_tiny_patch16_224 "
     "deit_small_patch16_224 --no-pretrained --stitch-plan large_to_small --img-size 32",
     "(--stitch-plan large_to_small, --img-size 32) cannot be built: 'stitch_plan': 'large_to_small' takes "
     "hierarchical anchors", None),
    ("quickstart --stitch-stages 5", QS + " --stitch-stages 5", "--stitch-stages 5: the CNN anchors have stages 0-3",
     None),
    ("quickstart pretrained anchors offline", "quickstart {w}/grow --out {out} --anchors resnet18 resnet34",
     "--anchors 'resnet18' needs timm's pretrained weights, which are not in the Hugging Face cache {w}/hub "
     "(repository timm/resnet18.a1_in1k) and cannot be downloaded (HF_HUB_OFFLINE is set); to start from local "
     "weights, write a stitch config whose anchors name them as \"checkpoint\" and train it with train.py",
     {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": "{w}/hub"}),
    ("quickstart one class", "quickstart {w}/oneclass --out {out}", "holds one class, 'circle': a classifier needs "
     "at least 2", None),
    ("quickstart class of one image", "quickstart {w}/lone --out {out}", "class 'ring' has 1 usable image(s) in "
     "'ring'; quickstart needs at least 2 per class", None),
    ("quickstart class of raw files", "quickstart {w}/raw --out {out}", "class 'ring' has 1 usable image(s) in "
     "'ring'; 11 other file(s) there are not images Pillow reads here ('ring/", None),
    ("quickstart raw files only", "quickstart {w}/rawonly --out {out}", "no class folder holds an image; its 2 "
     "file(s) are not images Pillow reads here ('a/IMG_0001.CR2', 'b/IMG_0001.CR2')", None),
    ("quickstart class of 16-bit images", "quickstart {w}/deep --out {out}", "class 'ring' has 1 usable image(s) in "
     "'ring' (11 skipped, a 16/32-bit image (mode I;16), which timm's loader would clip", None),
    ("quickstart unlabelled test/", "quickstart {w}/unlabelled --out {out}", "test/ holds no class folder with "
     "images, so nothing in it can be scored; give '{w}/unlabelled/train' as DATA", None),
    ("quickstart class missing from val/", "quickstart {w}/tvone --out {out}", "train/ and val/ hold different "
     "classes (only in train/: 'ring')", None),
    ("quickstart --out inside DATA", "quickstart {w}/grow --out {w}/grow/out", "--out '{w}/grow/out' is inside DATA "
     "'{w}/grow'", None),
    ("quickstart DATA changed since the split", "quickstart {w}/grown --out {w}/used", "DATA '{w}/grown' changed "
     "since '{w}/used/data' was split from it (12 image(s) added (e.g. 'star/train_0000.png'), new class folder(s) "
     "'star'); pass --fresh to start over", None),
    ("quickstart a used --out, another DATA", "quickstart {w}/lone --out {w}/used", "--out '{w}/used' holds a "
     "quickstart run on DATA '{w}/grown', not '{w}/lone'; pass --fresh", None),  # before lone's images are read
    ("convert LeViT of other depths than --levit-depths", "convert {w}/levit.pth {out}/x.pth.tar --trust "
     "--levit-depths 4 4 4", "anchors.0. holds a LeViT of stage depths 2-3-4, not 4-4-4; leave out --levit-depths",
     None),
    ("convert --levit-depths 0", "convert {w}/levit.pth {out}/x.pth.tar --trust --levit-depths 0 4 4",
     "argument --levit-depths: '0' is not a positive integer", None),
    ("convert LeViT blocks of no layout", "convert {w}/levit_gap.pth {out}/x.pth.tar --trust", "its levit keys "
     "cannot be mapped: anchors.1. its flat blocks 0..27 (subsample blocks [8, 18]) follow no LeViT layout", None),
    ("serve --port 70000", f"serve {DEMO}/snnet.pth.tar --results {DEMO}/stitches_res.txt --port 70000",
     "argument --port: '70000' is not a TCP port; give one in 1-65535", None),
    ("serve --exported of another checkpoint", "serve --exported {w}/export3 --results {w}/other_res.txt --port "
     "{port}", "results file '{w}/other_res.txt' holds results of another checkpoint (cfg_id 3: checkpoint_sha256 "
     "abababababababab..., the checkpoint export folder '{w}/export3' was exported from is ", None),
]


@pytest.mark.parametrize("case,argv,message,env", CASES, ids=[c[0] for c in CASES])
@pytest.mark.slow
def test_bad_input(case, argv, message, env, world, tmp_path, cli):
    import os
    import socket
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    fill = lambda s: s.format(w=world, out=tmp_path / "out", port=port)  # noqa: E731
    before = snapshot(world)
    if env is None:
        code, _, err = cli.call("snnet", fill(argv).split())
    else:  # read when huggingface_hub is imported: a fresh interpreter, not one forked from the tests' server
        done = subprocess.run([sys.executable, "-m", "snnet.cli", *fill(argv).split()], cwd=ROOT, text=True,
                              capture_output=True, timeout=300,
                              env={**os.environ, **{k: fill(v) for k, v in env.items()}})
        code, err = done.returncode, done.stderr
    err = err.strip()
    assert code == 2, (case, err)
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert fill(message) in err, err
    assert snapshot(world) == before and not (tmp_path / "out").exists(), "files were written or overwritten"


def test_an_out_the_kernel_refuses_is_refused_before_the_data_is_read(world, cli):
    """Permission bits allow root to write in /proc; making a folder there fails. Said before the data is read or
    any choice printed (it was a bare OSError line after the whole plan)."""
    code, out, err = cli.call("snnet", ["quickstart", f"{world}/grow", "--out", "/proc/snnet-out"])
    assert code == 2 and out == "" and err.strip().count("\n") == 0, (out, err)
    assert "--out '/proc/snnet-out' cannot be written: making a folder in '/proc' fails" in err, err


def test_a_quickstart_into_an_out_another_one_is_using_is_refused(world, tmp_path, cli):
    """Two quickstarts into one --out (two terminals): the second cleared and retrained the folders the first was
    training in, and the first then failed. The second is refused in one line naming the first; nothing of it is
    left. (The lock is held here, in the test's process; the quickstart runs in a forked one.)"""
    from snnet.utils.fileio import FolderLock
    out = tmp_path / "busy"
    with FolderLock(out, "--out"):
        code, _, err = cli.call("snnet", ["quickstart", f"{world}/grow", "--out", str(out)])
        assert sorted(p.name for p in out.iterdir()) == [FolderLock.NAME]
    assert code == 2 and err.strip().count("\n") == 0, err
    assert f"folder '{out}' is in use by another run (pid {os.getpid()} on" in err and "pass another --out" in err
    assert not out.exists()


# ------------------------------------------------------------------------------------ unusual but valid
def odd_folder(root: Path) -> Path:
    """A newcomer's photo folder: hidden files (macOS's ._ and .DS_Store, a Jupyter checkpoint folder), a note, an
    empty, a text and a truncated .jpg, a 16-bit PNG, a link to a photo on a disk that is not mounted, .gif/.webp/.tif
    images and a class with a year sub-folder."""
    data = shapes(root)
    px = (np.random.default_rng(0).random((16, 16, 3)) * 255).astype("uint8")
    for cls, ext in (("circle", "gif"), ("square", "webp"), ("ring", "tif")):
        Image.fromarray(px).save(data / cls / f"extra.{ext}")
    (data / "circle" / "._train_0000.png").write_bytes(b"\x00\x05\x16\x07" + bytes(80))
    (data / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (data / ".ipynb_checkpoints").mkdir()
    shutil.copy(data / "ring" / "train_0000.png", data / ".ipynb_checkpoints")
    (data / "ring" / "notes.txt").write_text("taken in 2019")
    (data / "circle" / "empty.jpg").write_bytes(b"")
    (data / "circle" / "text.jpg").write_text("not an image")
    jpg = data / "square" / "whole.jpg"
    Image.fromarray(np.repeat(np.repeat(px, 8, 0), 8, 1)).save(jpg)
    (data / "square" / "cut.jpg").write_bytes(jpg.read_bytes()[:600])
    Image.fromarray(np.full((16, 16), 4000, dtype=np.uint16)).save(data / "ring" / "deep.png")
    (data / "ring" / "trip.png").symlink_to(root / "unmounted" / "trip.png")
    (data / "circle" / "2019").mkdir()
    shutil.copy(data / "circle" / "train_0001.png", data / "circle" / "2019" / "beach.png")
    return data


def test_an_odd_photo_folder_is_read_and_every_file_left_out_is_named(tmp_path):
    """quickstart's preflight on odd_folder: every file it leaves out is named in a warning (hidden ones, the note,
    each image that cannot be trained on with why), the other formats and the year sub-folder's image are read
    (linked under names timm's reader lists), and the split holds exactly the readable images. Nothing is written
    until it passes."""
    from snnet.quickstart import QuickstartOptions, preflight
    data = odd_folder(tmp_path / "photos").resolve()
    out = (tmp_path / "out").resolve()
    args = QuickstartOptions(data=str(data), out=str(out), widths=[4, 8], img_size=16, nproc=1)
    summary, p, again = preflight(args, data, out)
    assert not out.exists() and again is None
    said = "\n".join(summary.warnings)
    assert len(summary.warnings) == 4, said  # hidden, not images, unreadable, sub-folders: one line each
    for name in ("'.DS_Store'", "'.ipynb_checkpoints/'", "'circle/._train_0000.png'", "'ring/notes.txt'",
                 "'circle/empty.jpg': an empty file", "'circle/text.jpg': not an image Pillow reads",
                 "'square/cut.jpg': unreadable (OSError", "'ring/deep.png': a 16/32-bit image (mode I;16)",
                 f"'ring/trip.png': a link to '{tmp_path / 'photos' / 'unmounted' / 'trip.png'}' that cannot be read",
                 "class folders hold sub-folders ('circle/2019')"):
        assert name in said, name
    linked = {name for split in summary.links.values() for links in split.values() for _, name in links}
    assert {"extra.gif.png", "extra.webp.png", "extra.tif.png", "2019__beach.png", "whole.jpg"} <= linked, linked
    assert not linked & {"empty.jpg", "text.jpg", "cut.jpg", "deep.png", "trip.png", "._train_0000.png", "notes.txt"}
    assert summary.train == {"circle": 11, "ring": 10, "square": 11} and summary.val == {"circle": 3, "ring": 3,
                                                                                         "square": 3}
    assert any(".gif/.tif/.webp images are read too" in n for n in summary.notes), summary.notes


def test_an_iphones_heic_photos_are_read_or_named_with_the_fix(tmp_path):
    """HEIC photos, an iPhone's default format, are images once pillow-heif is installed: quickstart reads them
    (linked under a .png name, which timm's reader lists; any process that imports snnet's data layer opens them);
    without it a refusal names them with the package to install."""
    from snnet.quickstart import _not_images, read_data
    assert _not_images([tmp_path / "a" / "IMG_0001.HEIC"], tmp_path) == (
        "not images Pillow reads here ('a/IMG_0001.HEIC'); HEIC photos (an iPhone's) are read once pillow-heif is "
        "installed (pip install pillow-heif), or convert them to JPEG")
    pytest.importorskip("pillow_heif", reason="pillow-heif is not installed (requirements-extras.txt)")
    data = shapes(tmp_path / "photos")
    before = read_data(data, tmp_path / "out")
    rng = np.random.default_rng(0)
    for cls in before.train:
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype("uint8")).save(data / cls / "IMG_0001.HEIC")
    summary = read_data(data, tmp_path / "out")
    count = lambda s: sum(s.train.values()) + sum(s.val.values())  # noqa: E731
    assert count(summary) == count(before) + len(before.train) and not summary.warnings, summary.warnings
    linked = {name for split in summary.links.values() for links in split.values() for _, name in links}
    assert "IMG_0001.HEIC.png" in linked and any(".heic images are read too" in n for n in summary.notes)
    with Image.open(data / "ring" / "IMG_0001.HEIC") as im:
        assert im.size == (16, 16)


def test_a_train_val_folder_whose_classes_hold_year_folders_keeps_its_classes(tmp_path):
    """train/cat/2019/*.png ...: timm's reader would name the classes 2019 and 2020; quickstart's classes are cat and
    dog, each with every image below it, and a warning says so."""
    from snnet.quickstart import read_data
    rng = np.random.default_rng(1)
    for split, n in (("train", 3), ("val", 1)):
        for cls in ("cat", "dog"):
            for year in ("2019", "2020"):
                (tmp_path / "d" / split / cls / year).mkdir(parents=True)
                for i in range(n):
                    px = (rng.random((16, 16, 3)) * 255).astype("uint8")
                    Image.fromarray(px).save(tmp_path / "d" / split / cls / year / f"{i}.png")
    summary = read_data(tmp_path / "d", tmp_path / "out")
    assert summary.train == {"cat": 6, "dog": 6} and summary.val == {"cat": 2, "dog": 2}
    assert len(summary.warnings) == 1 and "('cat/2019', 'cat/2020', 'dog/2019', 'dog/2020')" in summary.warnings[0]


@pytest.mark.slow
def test_convert_says_what_it_converted(world, tmp_path, cli):
    """A LeViT release of anchors of two depths converts (each anchor's depths read from its keys) and loads into
    timm's models; a timm network's checkpoint is written pickle-free with a line saying it is one network's
    weights, to be used as an anchor's checkpoint, not an SN-Net."""
    import timm
    code, out, err = cli.call("snnet", ["convert", world / "levit.pth", tmp_path / "levit.pth.tar", "--trust"])
    assert code == 0 and "(levit, mapped to timm 1.0 keys, " in out, err
    sd = torch.load(tmp_path / "levit.pth.tar", weights_only=True)["state_dict"]
    for i, name in enumerate(("levit_128s", "levit_128")):
        model = timm.create_model(name, num_classes=3)
        model.load_state_dict({k[len(f"anchors.{i}."):]: v for k, v in sd.items() if k.startswith(f"anchors.{i}.")},
                              strict=False)
        missing = set(model.state_dict()) - {k[len(f"anchors.{i}."):] for k in sd if k.startswith(f"anchors.{i}.")}
        assert all(k.endswith("attention_bias_idxs") for k in missing), missing
    code, out, err = cli.call("snnet", ["convert", world / "timm_resnet.pth.tar", tmp_path / "r.pth.tar", "--trust"])
    assert code == 0 and "one plain network's weights" in out and "not with train.py --resume" in out, (out, err)
    assert "conv1" in out and torch.load(tmp_path / "r.pth.tar", weights_only=True)["state_dict"]
